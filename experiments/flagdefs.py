"""The flags several commands take, each defined once here (eval, extract, tune, severity, the converters, benches).

A command asks for the ones it uses with :func:`define`; they become key flags of the calling module, so its
``--help`` lists them beside its own flags. A flag already defined (``tune`` imports ``eval``'s) is only declared
again as a key flag of the caller. Values are validated at parse time: a bad one is a usage error (one line).

    flagdefs.define("checkpoint", "database_folder", "image_size", "precision")
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

from absl import flags

from attllm_jax.files import default_cache_dir
from attllm_jax.models.precision import PRECISIONS

FLAGS = flags.FLAGS


def parse_values(values) -> list[float]:
    """Numbers of a list flag: each entry a number or ``start:stop:count`` (``count`` evenly spaced, both ends).

    Raises:
        ValueError: for an entry that is neither.
    """
    out = []
    for value in values:
        parts = str(value).split(":")
        if len(parts) == 1:
            out.append(float(parts[0]))
        elif len(parts) == 3 and parts[2].strip().isdigit() and int(parts[2]) >= 1:
            start, stop, count = float(parts[0]), float(parts[1]), int(parts[2])
            out.extend([start] if count == 1 else [start + (stop - start) * i / (count - 1) for i in range(count)])
        else:
            raise ValueError(f"{value!r} is neither a number nor start:stop:count")
    return out


def _valid_alphas(values) -> bool:
    if values is None:
        return True
    try:
        alphas = parse_values(values)
    except ValueError:
        return False
    return (
        bool(alphas) and all(math.isfinite(a) and 0.0 <= a <= 1.0 for a in alphas) and len(set(alphas)) == len(alphas)
    )


def _valid_recall_values(values) -> bool:
    try:
        ints = [int(v) for v in values]
    except ValueError:
        return False
    return bool(ints) and all(n >= 1 for n in ints) and len(set(ints)) == len(ints)


def _valid_image_size(values) -> bool:
    if values is None:
        return True
    try:
        ints = [int(v) for v in values]
    except ValueError:
        return False
    return len(ints) in (1, 2) and all(v >= 1 for v in ints)


def _at_least_one(name: str) -> tuple[Callable, str]:
    return (lambda v: v is None or v >= 1), f"--{name} must be >= 1"


def _define_checkpoint() -> None:
    flags.DEFINE_string("checkpoint", None, "Converted model directory; default: random-weight CosPlace ResNet-18/512.")


# EvalConfig.RANDOM_MODELS, written out so that --help needs no JAX import (tests/test_eval_demo.py holds them equal)
RANDOM_MODEL_CHOICES = (
    "cosplace",
    "megaloc",
    "boq_dinov2",
    "boq_resnet50",
    "mixvpr",
    "netvlad",
    "supervlad",
    "image4vpr",
)


def _define_random_model() -> None:
    flags.DEFINE_enum(
        "random_model",
        "cosplace",
        list(RANDOM_MODEL_CHOICES),
        "Random-weight model without --checkpoint (the demo's): CosPlace ResNet-18/512, or a released architecture "
        "(MegaLoc, BoQ, MixVPR, NetVLAD, SuperVLAD, ImAge) with random weights.",
    )


def _define_database_folder() -> None:
    flags.DEFINE_string("database_folder", None, "Database images (names @utm_east@utm_north@...@.jpg or a CSV).")


def _define_queries_folder() -> None:
    flags.DEFINE_string("queries_folder", None, "Query images (names lat_lon@....jpg, @east@north@...@.jpg or a CSV).")


def _define_database_csv() -> None:
    flags.DEFINE_string("database_csv", None, "Optional CSV path,lat,lon or path,utm_east,utm_north for the database.")


def _define_convention() -> None:
    flags.DEFINE_enum("convention", "auto", ["auto", "sfxl", "flood"], "File-name coordinate convention.")


def _define_image_size() -> None:
    flags.DEFINE_list(
        "image_size",
        None,
        "Resize override: shorter side (one int) or height,width; default: the model's own (the demo: 288). "
        "Part of the descriptor store's key.",
    )
    flags.register_validator("image_size", _valid_image_size, "--image_size must be one or two integers >= 1")


def _define_batch_size() -> None:
    flags.DEFINE_integer("batch_size", 8, "Images per device batch (rounded up to a multiple of the device count).")
    flags.register_validator("batch_size", *_at_least_one("batch_size"))


def _define_num_workers() -> None:
    flags.DEFINE_integer("num_workers", None, "Image decode threads (default: cores, at most 8).")
    flags.register_validator("num_workers", *_at_least_one("num_workers"))


def _define_store_dir() -> None:
    flags.DEFINE_string(
        "store_dir",
        None,
        "Database descriptor store: a directory or a kvstore URL (eval, tune, severity: default "
        "OUTPUT_DIR/database_store; extract: required).",
    )


def _define_chunk_size() -> None:
    flags.DEFINE_integer(
        "chunk_size", None, "Database images per store chunk, the resume granularity (default 256 on CPU, 4096 else)."
    )
    flags.register_validator("chunk_size", *_at_least_one("chunk_size"))


def _define_store_dtype() -> None:
    flags.DEFINE_enum(
        "store_dtype", "float32", ["float32", "float16"], "Stored descriptor dtype (float16: half the bytes)."
    )


def _define_model_seed() -> None:
    flags.DEFINE_integer("model_seed", 0, "Seed of the random-weight model (without --checkpoint).")


def _define_precision() -> None:
    flags.DEFINE_enum(
        "precision",
        "float32",
        list(PRECISIONS),
        "float32: highest matmul precision on every backend; tf32: the backend's fast float32 products; "
        "bfloat16: bfloat16 backbone, float32 norms and aggregation (see README, Precision). Part of the descriptor "
        "store's key.",
    )


def _define_cache_dir() -> None:
    flags.DEFINE_string(
        "cache_dir",
        str(default_cache_dir()),
        "attllm_jax's cache: downloaded checkpoints and the demo's synthetic benchmark (default $ATTLLM_JAX_CACHE, "
        "else ~/.cache/attllm_jax).",
    )


def _define_alphas() -> None:
    flags.DEFINE_list(
        "alphas",
        None,
        "Blend factors in [0, 1]: a list (0,0.25,0.5,1) or start:stop:count (0:1:11 is 0, 0.1, ..., 1), or both "
        "(0,0.5:1:6); the default is in the command's description.",
    )
    flags.register_validator(
        "alphas", _valid_alphas, "--alphas must be distinct numbers in [0, 1] (a list, or start:stop:count)"
    )


def _define_recall_values() -> None:
    flags.DEFINE_list("recall_values", ["1", "5", "10", "20"], "The N of recall@N.")
    flags.register_validator("recall_values", _valid_recall_values, "--recall_values must be distinct integers >= 1")


def _define_positive_dist_threshold() -> None:
    flags.DEFINE_float("positive_dist_threshold", 25.0, "Positive radius in metres (boundary included).")
    flags.register_validator(
        "positive_dist_threshold", lambda v: math.isfinite(v) and v > 0, "--positive_dist_threshold must be > 0 metres"
    )


def _valid_reranks(values) -> bool:
    if not values:  # the default: no stage, and no JAX import for --help
        return True
    from attllm_jax.retrieval.rerank import RerankSpecError, parse_reranks

    try:
        parse_reranks(values or [])
    except RerankSpecError as error:
        raise flags.ValidationError(str(error)) from None
    return True


def _define_rerank() -> None:
    flags.DEFINE_multi_string(
        "rerank",
        [],
        "Query-expansion re-ranking after the search, repeatable (one per kind): aqe:k=5,w=0.8 (average query "
        "expansion, q' = w q + (1-w) mean of the top-k) or alpha_qe:k=5,alpha=3 (q' = normalize(q + sum_i "
        "max(q.d_i, 0)^alpha d_i)); eval: results.json rerank.<kind>.recalls per alpha; localize: one stage, "
        "k <= --top_k, the matches of the expanded search.",
    )
    flags.register_validator("rerank", _valid_reranks, "bad --rerank")


def _define_save_descriptors() -> None:
    flags.DEFINE_bool(
        "save_descriptors",
        False,
        "Also write OUTPUT_DIR/descriptors/queries_alpha_<a>.npy ([Q, D] float32 per alpha) and queries.txt; the "
        "database descriptors stay in the store (attllm_jax.retrieval.read_store).",
    )


def _define_alpha_policy() -> None:
    flags.DEFINE_enum(
        "alpha_policy",
        None,
        ["margin"],
        "Query-adaptive alpha: per query the grid alpha with the largest top-1 minus top-2 similarity (no labels); "
        "eval reports its recall, tune compares it with the best global alpha on the same folds.",
    )


def _define_utm_zone() -> None:
    flags.DEFINE_string("utm_zone", None, "UTM zone of plain-UTM database names, e.g. 10S.")


def _define_alpha() -> None:
    flags.DEFINE_float("alpha", None, "Attention blend factor in [0, 1] (default 0.5 with attention, else 0).")
    flags.register_validator(
        "alpha", lambda v: v is None or (math.isfinite(v) and 0 <= v <= 1), "--alpha must lie in [0, 1]"
    )


def _define_sigma() -> None:
    flags.DEFINE_float("sigma", 0.2, "RBF width of point attention maps.")
    flags.register_validator("sigma", lambda v: math.isfinite(v) and v > 0, "--sigma must be > 0")


def _define_top_k() -> None:
    flags.DEFINE_integer("top_k", 10, "Database candidates kept per photo.")
    flags.register_validator("top_k", lambda v: v >= 1, "--top_k must be >= 1")


def _define_estimator() -> None:
    flags.DEFINE_enum(
        "estimator",
        "top1",
        ["top1", "cluster"],
        "top1: the best match; cluster: score-weighted centre of the largest cluster of the top-K within "
        "--cluster_radius.",
    )


def _define_metres(name: str, help_text: str) -> Callable[[], None]:
    def define() -> None:
        flags.DEFINE_float(name, 25.0, help_text)
        flags.register_validator(name, lambda v: math.isfinite(v) and v > 0, f"--{name} must be > 0")

    return define


def _define_blend() -> None:
    flags.DEFINE_enum("blend", "native", ["native", "uniform"], "Attention blend (uniform: CosPlace/EigenPlaces only).")


def _define_tuning() -> None:
    flags.DEFINE_string(
        "tuning",
        None,
        "tuning.json written by attllm-tune: take its best alpha, sigma and blend (not with those flags).",
    )


class TuningConflict(ValueError):
    """--tuning given with --alpha, --sigma or --blend (a usage error)."""


def blend_setting(default_alpha: float) -> tuple[float, float, str]:
    """``(alpha, sigma, blend)`` of the shared flags: from --tuning (its ``best`` entry), or --alpha (default
    ``default_alpha``), --sigma and --blend.

    Raises:
        TuningConflict: --tuning with any of the three.
        ValueError, FileNotFoundError: a bad tuning file (one line naming it).
    """
    if FLAGS.tuning is None:
        alpha = FLAGS.alpha if FLAGS.alpha is not None else default_alpha
        return alpha, FLAGS.sigma, FLAGS.blend
    given = [f"--{name}" for name in ("alpha", "sigma", "blend") if FLAGS[name].present]
    if given:
        raise TuningConflict(f"--tuning sets alpha, sigma and blend: give it or {', '.join(given)}, not both")
    from attllm_jax.tuning.choice import read_tuned_setting

    setting, _ = read_tuned_setting(FLAGS.tuning)
    return setting.alpha, setting.sigma, setting.blend


def localize_fields() -> dict:
    """The :class:`~attllm_jax.localization.LocalizeSettings` fields that localize and serve take from the same flags
    (the database's, the model's and the per-photo ones; not the photos, the output, the size or the blend)."""
    return dict(
        database_csv=FLAGS.database_csv,
        store_dir=FLAGS.store_dir,
        utm_zone=FLAGS.utm_zone,
        checkpoint=FLAGS.checkpoint,
        random_model=FLAGS.random_model,
        model_seed=FLAGS.model_seed,
        precision=FLAGS.precision,
        top_k=FLAGS.top_k,
        estimator=FLAGS.estimator,
        cluster_radius_m=FLAGS.cluster_radius,
        radius_m=FLAGS.radius,
        calibration=FLAGS.calibration,
        convention=FLAGS.convention,
    )


def _define_calibration() -> None:
    flags.DEFINE_string("calibration", None, "Calibration JSON (attllm-eval --calibration_out); none = uncalibrated.")


# localize's per-photo flags (estimate, blend, confidence), shared with the service (experiments.serve)
_LOCALIZE_DEFINITIONS: dict[str, Callable[[], None]] = {
    "utm_zone": _define_utm_zone,
    "alpha": _define_alpha,
    "sigma": _define_sigma,
    "blend": _define_blend,
    "tuning": _define_tuning,
    "top_k": _define_top_k,
    "estimator": _define_estimator,
    "cluster_radius": _define_metres("cluster_radius", "Cluster radius of --estimator cluster, metres."),
    "radius": _define_metres("radius", "The confidence is P(estimate within this many metres of the truth)."),
    "calibration": _define_calibration,
}

LOCALIZE_FLAGS = tuple(_LOCALIZE_DEFINITIONS)  # localize and serve define all of them
# The database and model flags localize and serve both define (localize_fields reads them).
LOCALIZE_MODEL_FLAGS = (
    "database_folder",
    "database_csv",
    "store_dir",
    "convention",
    "checkpoint",
    "random_model",
    "model_seed",
    "precision",
    "image_size",
    "cache_dir",
)

_DEFINITIONS: dict[str, Callable[[], None]] = {
    "checkpoint": _define_checkpoint,
    "random_model": _define_random_model,
    "database_folder": _define_database_folder,
    "queries_folder": _define_queries_folder,
    "database_csv": _define_database_csv,
    "convention": _define_convention,
    "image_size": _define_image_size,
    "batch_size": _define_batch_size,
    "num_workers": _define_num_workers,
    "store_dir": _define_store_dir,
    "chunk_size": _define_chunk_size,
    "store_dtype": _define_store_dtype,
    "model_seed": _define_model_seed,
    "precision": _define_precision,
    "cache_dir": _define_cache_dir,
    "alphas": _define_alphas,
    "recall_values": _define_recall_values,
    "positive_dist_threshold": _define_positive_dist_threshold,
    "rerank": _define_rerank,
    "save_descriptors": _define_save_descriptors,
    "alpha_policy": _define_alpha_policy,
    **_LOCALIZE_DEFINITIONS,
}
NAMES = tuple(_DEFINITIONS)


def module_key(name: str) -> str:
    """How absl names the module ``name`` (a script run as ``__main__`` is keyed by its path, ``sys.argv[0]``)."""
    return sys.argv[0] if name == "__main__" else name


def define(*names: str) -> None:
    """Defines the shared flags ``names`` (once per process) as key flags of the calling module.

    Raises:
        KeyError: a name that is not shared here.
    """
    caller = module_key(sys._getframe(1).f_globals["__name__"])
    for name in names:
        if name not in FLAGS:
            _DEFINITIONS[name]()
        FLAGS.register_key_flag_for_module(caller, FLAGS[name])


def define_llm_flags(prefix: str, workers: int, item: str) -> None:
    """The request flags of an LLM asked for attention, each named ``--<prefix>...``: ``llm_model``, ``base_url``,
    ``city``, ``prompt``, ``workers``, ``qpm``, ``timeout_s``, ``max_attempts`` (localize: prefix ""; eval's
    database side: "db_"). The command defines ``--<prefix>provider`` itself (its choices differ).

    Args:
        prefix: The flag-name prefix.
        workers: Default requests in flight.
        item: What one request is about ("photo", "image"), for the help.
    """
    owner = f"--{prefix}provider"
    caller = module_key(sys._getframe(1).f_globals["__name__"])

    def name(flag: str) -> str:
        return f"{prefix}{flag}"

    flags.DEFINE_string(
        name("llm_model"), None, f"{owner}: model asked (default gemini-2.5-flash; required for openai)."
    )
    flags.DEFINE_string(name("base_url"), None, f"{owner}: endpoint instead of the provider's default (proxy, local).")
    flags.DEFINE_string(name("city"), None, f"{owner} gemini/openai: the city named in the prompt.")
    flags.DEFINE_string(
        name("prompt"), "axis_focus", f"{owner} gemini/openai: prompt id (as attllm-annotate --prompt)."
    )
    flags.DEFINE_integer(
        name("workers"), workers, f"{owner}: requests in flight at once (within --{name('qpm')}).", lower_bound=1
    )
    flags.DEFINE_float(
        name("qpm"), 60.0, f"{owner}: requests per minute, retries included (0: no limit).", lower_bound=0
    )
    flags.DEFINE_float(name("timeout_s"), 60.0, f"{owner}: total deadline of each request, seconds.", lower_bound=0.001)
    flags.DEFINE_integer(name("max_attempts"), 5, f"{owner}: attempts per {item} on 429/5xx/timeouts.", lower_bound=1)
    for flag in ("llm_model", "base_url", "city", "prompt", "workers", "qpm", "timeout_s", "max_attempts"):
        FLAGS.register_key_flag_for_module(caller, FLAGS[name(flag)])  # listed by the command's --help


def llm_source_settings(prefix: str, **extra):
    """The :class:`~attllm_jax.attention.sources.SourceSettings` of ``--<prefix>provider`` and the flags of
    :func:`define_llm_flags` (``extra``: more fields, e.g. ``masks``), or None without a provider."""
    provider = FLAGS[f"{prefix}provider"].value
    if provider is None:
        return None
    from attllm_jax.attention.sources import SourceSettings

    def value(flag: str):
        return FLAGS[f"{prefix}{flag}"].value

    return SourceSettings(
        provider=provider,
        model=value("llm_model"),
        base_url=value("base_url"),
        timeout_s=value("timeout_s"),
        qpm=value("qpm"),
        max_attempts=value("max_attempts"),
        **extra,
    )


def image_size() -> int | tuple[int, int] | None:
    """The parsed ``--image_size``: None, the shorter side, or ``(height, width)``."""
    if not FLAGS.image_size:
        return None
    sizes = [int(v) for v in FLAGS.image_size]
    return sizes[0] if len(sizes) == 1 else (sizes[0], sizes[1])


def recall_values() -> tuple[int, ...]:
    """The parsed ``--recall_values`` (validated at parse time)."""
    return tuple(int(v) for v in FLAGS.recall_values)
