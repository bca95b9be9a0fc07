"""The settings of one evaluation run, validated before any work starts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from attllm_jax.data.coordinates import CONVENTIONS
from attllm_jax.models.precision import validate_precision
from attllm_jax.outputs import refuse_output_inside
from attllm_jax.retrieval.recall import alpha_key, validate_recall_values  # noqa: F401  (alpha_key: public here)
from attllm_jax.retrieval.search import SearchSpec

if TYPE_CHECKING:
    from attllm_jax.attention.sources import SourceSettings

DISTANCES = ("utm", "haversine")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate and where to write it.

    Attributes:
        database_folder: Database images.
        queries_folder: Query images.
        output_dir: Where results, logs and figures go.
        checkpoint: A converted model directory; None = a random-weight CosPlace ResNet-18/512 built in JAX.
        attention_dir: Attention files of the queries (``find_attention_file`` naming); None = no attention.
        attention_dirs: Every source of ``--attention_dir A,B`` (the first is ``attention_dir``, whose results stay
            the top-level ones); with two or more, each source and their mean map (the ensemble) are also
            evaluated (docs/DESIGN.md section 13). Empty or one entry: a single source, as before.
        alphas: Blend factors in [0, 1]; every one is evaluated from one backbone pass per query.
        recall_values: The N of recall@N.
        positive_dist_threshold: Positive radius in metres (boundary included).
        distance: "utm" (Euclidean in one UTM zone) or "haversine" (great circle on lat/lon).
        database_csv: Optional coordinates CSV of the database (``path,lat,lon`` or ``path,utm_east,utm_north``).
        queries_csv: Optional coordinates CSV of the queries.
        convention: File-name coordinate convention: "auto", "sfxl" or "flood".
        image_size: Override of the model's resize: shorter side (int) or ``(height, width)``.
        batch_size: Images per device batch (rounded up to a multiple of the local device count).
        num_workers: Decode threads (None = cores, at most 8).
        max_batch_pixels: Pixel budget of one batch (None = batch_size megapixels): large shapes get fewer rows,
            and an image whose preprocessed size alone exceeds the budget is skipped and counted.
        store_dir: Database descriptor store: a directory or a tensorstore kvstore URL (None =
            ``output_dir/database_store``).
        chunk_size: Images per store chunk, the resume granularity (None = about a minute of work: 256 on the CPU,
            4096 on an accelerator).
        store_dtype: Stored descriptor dtype, "float32" or "float16" (half the bytes; its recall effect is the
            float16 rounding of each descriptor, ~5e-4 relative).
        sigma: RBF width of point attention maps.
        grid_interpolate: Bilinear upsampling of grid answers instead of sharp cells.
        max_points: Point slots per attention answer.
        num_preds_to_save: Top-K prediction strips saved per query and alpha (0 = none).
        model_seed: Seed of the random-weight model (ignored with a checkpoint).
        random_model: Which random-weight model without a checkpoint (:data:`RANDOM_MODELS`; the demo's).
        notes: Extra lines printed with the results (e.g. the demo's disclaimers).
        search: How the database is searched (method, faiss parameters, memory budget).
        precision: The model's precision, "float32", "tf32" or "bfloat16" (see attllm_jax.models.precision).
        save_descriptors: Also write the query descriptors of every alpha to ``output_dir/descriptors``.
        rerank: Query-expansion stages after the search (``aqe:k=5,w=0.8``, ``alpha_qe:k=5,alpha=3``; one per kind).
        alpha_policy: None, or a query-adaptive alpha policy (``"margin"``) reported beside the fixed alphas.
        symmetric_k: Shortlist-symmetric attention on each query's top-k database images (0 = off).
        alpha_db: Blend factor of the database-side attention.
        db_attention_dir: Attention files of the database images, the symmetric stage's cache (None =
            ``output_dir/database_attention``).
        db_masks: Water/clutter masks of the database images: the masks provider answers the images not cached
            (None = only the cached files are used).
        llm_cost_per_1000: Price of 1000 LLM calls for the cost model (None = no estimate).
        db_provider: The LLM that answers the ``symmetric_k`` database images not cached yet (``gemini`` /
            ``openai`` :class:`~attllm_jax.attention.sources.SourceSettings`; None = ``db_masks`` or the cache only).
        db_city: The city named in the database prompt; db_prompt: its prompt id; db_workers: requests in flight.
        chain_stages: Also run every ``rerank`` stage followed by the symmetric stage (and ``alpha_policy``) as one
            chain (needs both ``rerank`` and ``symmetric_k``); each stage's own entry stays independent.
    """

    database_folder: str
    queries_folder: str
    output_dir: str
    checkpoint: str | None = None
    attention_dir: str | None = None
    attention_dirs: tuple[str, ...] = ()
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    recall_values: tuple[int, ...] = (1, 5, 10, 20)
    positive_dist_threshold: float = 25.0
    distance: str = "utm"
    database_csv: str | None = None
    queries_csv: str | None = None
    convention: str = "auto"
    image_size: int | tuple[int, int] | None = None
    batch_size: int = 8
    num_workers: int | None = None
    max_batch_pixels: int | None = None
    store_dir: str | None = None
    chunk_size: int | None = None
    store_dtype: str = "float32"
    sigma: float = 0.2
    grid_interpolate: bool = False
    max_points: int = 8
    num_preds_to_save: int = 0
    model_seed: int = 0
    random_model: str = "cosplace"
    notes: tuple[str, ...] = field(default=())
    search: SearchSpec = field(default_factory=SearchSpec)
    precision: str = "float32"
    save_descriptors: bool = False
    rerank: tuple[str, ...] = ()
    alpha_policy: str | None = None
    symmetric_k: int = 0
    alpha_db: float = 0.5
    db_attention_dir: str | None = None
    db_masks: str | None = None
    llm_cost_per_1000: float | None = None
    db_provider: SourceSettings | None = None
    db_city: str = "unknown"
    db_prompt: str = "axis_focus"
    db_workers: int = 4
    chain_stages: bool = False

    @property
    def resolved_store_dir(self) -> Path | str:
        """The store's directory, or its kvstore URL (kept as a string)."""
        if self.store_dir and "://" in str(self.store_dir):
            return str(self.store_dir)
        return Path(self.store_dir) if self.store_dir else Path(self.output_dir) / "database_store"

    @property
    def resolved_chunk_size(self) -> int:
        """``chunk_size``, or about a minute of extraction: 256 images on the CPU, 4096 on an accelerator."""
        if self.chunk_size is not None:
            return int(self.chunk_size)
        import jax

        return 256 if jax.default_backend() == "cpu" else 4096

    def check_output_outside_inputs(self) -> None:
        """Raises ValueError when --output_dir is, or lies inside, the database or queries folder (a later run
        would read the result images as inputs). Called by the commands that write into --output_dir."""
        refuse_output_inside(
            self.output_dir, {"--database_folder": self.database_folder, "--queries_folder": self.queries_folder}
        )

    def validated(self) -> EvalConfig:
        """Checks every setting that does not need the data; returns a normalized copy.

        Raises:
            ValueError: naming the first bad setting.
            FileNotFoundError: for a missing folder, checkpoint, attention directory or CSV.
        """
        alphas = tuple(float(a) for a in self.alphas)
        if not alphas:
            raise ValueError("--alphas must list at least one value")
        bad = [a for a in alphas if not (math.isfinite(a) and 0.0 <= a <= 1.0)]
        if bad:
            raise ValueError(f"--alphas must lie in [0, 1], got {bad}")
        if len(set(alphas)) != len(alphas):
            raise ValueError(f"--alphas must be distinct, got {list(alphas)}")
        recall_values = tuple(validate_recall_values(self.recall_values))
        threshold = float(self.positive_dist_threshold)
        if not (math.isfinite(threshold) and threshold > 0):
            raise ValueError(f"--positive_dist_threshold must be a positive number of metres, got {threshold}")
        if self.distance not in DISTANCES:
            raise ValueError(f"--distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.convention not in CONVENTIONS:
            raise ValueError(f"--convention must be one of {CONVENTIONS}, got {self.convention!r}")
        for name in ("batch_size", "chunk_size", "max_points"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers is not None and int(self.num_workers) < 1:
            raise ValueError(f"--num_workers must be >= 1, got {self.num_workers}")
        if self.max_batch_pixels is not None and int(self.max_batch_pixels) < 1:
            raise ValueError(f"--max_batch_pixels must be >= 1, got {self.max_batch_pixels}")
        if int(self.num_preds_to_save) < 0:
            raise ValueError(f"--num_preds_to_save must be >= 0, got {self.num_preds_to_save}")
        if not (math.isfinite(float(self.sigma)) and float(self.sigma) > 0):
            raise ValueError(f"--sigma must be positive, got {self.sigma}")
        image_size = _validate_image_size(self.image_size)
        validate_precision(self.precision, "--precision")
        self.search.validated()
        _validate_post_search(self, recall_values)
        if self.store_dtype not in ("float32", "float16"):
            raise ValueError(f"--store_dtype must be float32 or float16, got {self.store_dtype!r}")
        for name in ("database_folder", "queries_folder"):
            if not Path(getattr(self, name)).is_dir():
                raise FileNotFoundError(f"--{name} {getattr(self, name)!r} is not a directory")
        _check_not_a_torch_file(self.checkpoint)
        _validate_attention_dirs(self.attention_dir, tuple(self.attention_dirs))
        for name in ("checkpoint", "attention_dir"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_dir():
                raise FileNotFoundError(f"--{name} {value!r} is not a directory")
        for name in ("database_csv", "queries_csv"):
            value = getattr(self, name)
            if value is not None and not Path(value).is_file():
                raise FileNotFoundError(f"--{name} {value!r} is not a file")
        if self.random_model not in RANDOM_MODELS:
            raise ValueError(f"--random_model must be one of {', '.join(RANDOM_MODELS)}, got {self.random_model!r}")
        output = Path(self.output_dir)
        if output.exists() and not output.is_dir():
            raise ValueError(f"--output_dir {self.output_dir!r} exists and is not a directory")
        return replace(
            self,
            alphas=alphas,
            recall_values=recall_values,
            positive_dist_threshold=threshold,
            image_size=image_size,
            batch_size=int(self.batch_size),
            chunk_size=None if self.chunk_size is None else int(self.chunk_size),
            num_workers=None if self.num_workers is None else int(self.num_workers),
            num_preds_to_save=int(self.num_preds_to_save),
            max_batch_pixels=None if self.max_batch_pixels is None else int(self.max_batch_pixels),
            rerank=tuple(self.rerank),
            attention_dirs=tuple(str(d) for d in self.attention_dirs),
        )


def _validate_attention_dirs(first: str | None, dirs: tuple[str, ...]) -> None:
    """``--attention_dir A,B``: no empty entry, every entry a folder, no folder twice, the first is attention_dir."""
    if not dirs:
        return
    joined = ",".join(str(d) for d in dirs)
    for i, entry in enumerate(dirs):
        if not str(entry).strip():
            raise ValueError(f"--attention_dir {joined!r}: entry {i + 1} is empty (give folders separated by commas)")
        if not Path(entry).is_dir():
            raise FileNotFoundError(f"--attention_dir {joined!r}: entry {i + 1} {str(entry)!r} is not a directory")
    resolved = [Path(d).resolve() for d in dirs]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"--attention_dir {joined!r}: a folder is given twice")
    if first is None or Path(first).resolve() != resolved[0]:
        raise ValueError(f"attention_dir {first!r} must be the first of attention_dirs {list(dirs)}")


def _validate_post_search(config: EvalConfig, recall_values: tuple[int, ...]) -> None:
    """--rerank specs parse and their k fit the predictions kept; --alpha_policy is known and has 2 predictions."""
    from attllm_jax.retrieval.adaptive import ALPHA_POLICIES

    kept = max(max(recall_values), int(config.num_preds_to_save))
    if config.rerank:
        from attllm_jax.retrieval.rerank import parse_reranks  # imports JAX: only when there are stages
    for spec in parse_reranks(config.rerank) if config.rerank else ():
        if spec.k > kept:
            raise ValueError(
                f"--rerank {spec.label()}: k = {spec.k} exceeds the {kept} predictions kept per query (the largest "
                "of --recall_values and --num_preds_to_save); lower k or add a larger N to --recall_values"
            )
    if int(config.symmetric_k) < 0 or int(config.symmetric_k) > kept:
        raise ValueError(
            f"--symmetric_k must be in [0, {kept}] (the predictions kept per query: the largest of --recall_values "
            f"and --num_preds_to_save), got {config.symmetric_k}"
        )
    if not (math.isfinite(float(config.alpha_db)) and 0.0 <= float(config.alpha_db) <= 1.0):
        raise ValueError(f"--alpha_db must lie in [0, 1], got {config.alpha_db}")
    if config.db_masks is not None and not Path(config.db_masks).is_dir():
        raise FileNotFoundError(f"--db_masks {config.db_masks!r} is not a directory")
    if config.llm_cost_per_1000 is not None and not float(config.llm_cost_per_1000) >= 0:
        raise ValueError(f"--llm_cost_per_1000 must be >= 0, got {config.llm_cost_per_1000}")
    if config.db_provider is not None:
        _validate_db_provider(config)
    if config.chain_stages and not (config.rerank and int(config.symmetric_k) > 0):
        raise ValueError(
            "--chain_stages chains --rerank and --symmetric_k: give both (e.g. --rerank aqe:k=5,w=0.8 --symmetric_k 10)"
        )
    if config.alpha_policy is not None:
        if config.alpha_policy not in ALPHA_POLICIES:
            raise ValueError(f"--alpha_policy must be one of {ALPHA_POLICIES}, got {config.alpha_policy!r}")
        if kept < 2:
            raise ValueError("--alpha_policy margin needs 2 predictions per query: add an N >= 2 to --recall_values")


def _validate_db_provider(config: EvalConfig) -> None:
    """--db_provider: gemini or openai, with --symmetric_k, a city, a known prompt, not with --db_masks; the
    provider is built once here (a missing key or model is one line before any work)."""
    from attllm_jax.attention import prompts
    from attllm_jax.attention.sources import make_answer_source

    name = config.db_provider.provider
    if name not in ("gemini", "openai"):
        raise ValueError(f"--db_provider must be gemini or openai, got {name!r}")
    if int(config.symmetric_k) < 1:
        raise ValueError("--db_provider annotates the --symmetric_k shortlists: give --symmetric_k (e.g. 10)")
    if config.db_masks is not None:
        raise ValueError("give --db_provider (an LLM) or --db_masks (the masks oracle), not both")
    if (config.db_city or "unknown") == "unknown":
        raise ValueError(f"--db_provider {name} needs --db_city (the city named in the prompt)")
    if int(config.db_workers) < 1:
        raise ValueError(f"--db_workers must be >= 1, got {config.db_workers}")
    prompts.get_prompt(config.db_prompt)
    make_answer_source(config.db_provider).close()


# The random-weight models without a checkpoint (built by attllm_jax.evaluation.demo.random_model).
RANDOM_MODELS = ("cosplace", "megaloc", "boq_dinov2", "boq_resnet50", "mixvpr", "netvlad", "supervlad", "image4vpr")
TORCH_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin")


def _check_not_a_torch_file(checkpoint: str | None) -> None:
    """A PyTorch checkpoint file given as --checkpoint: say how to convert it (a converted model is a directory)."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return
    if Path(checkpoint).suffix.lower() in TORCH_CHECKPOINT_SUFFIXES:
        raise ValueError(
            f"--checkpoint {checkpoint!r} is a PyTorch checkpoint file; convert it first "
            f'(pip install -e ".[convert]"; attllm-convert <family> --checkpoint {checkpoint} --output DIR) '
            "and pass the output DIR as --checkpoint"
        )
    raise ValueError(f"--checkpoint {checkpoint!r} is a file; it must be a converted model directory (attllm-convert)")


def _validate_image_size(value) -> int | tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = value[0]
        elif len(value) == 2 and all(int(v) == v and int(v) > 0 for v in value):
            return (int(value[0]), int(value[1]))
        else:
            raise ValueError(f"--image_size must be one positive int or two (height, width), got {list(value)}")
    if int(value) != value or int(value) < 1:
        raise ValueError(f"--image_size must be a positive integer, got {value!r}")
    return int(value)
