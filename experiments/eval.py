r"""Evaluate flood-query geo-localization for every alpha: ``attllm-eval`` (or ``python -m experiments.eval``).

With no dataset flags it runs the self-contained demo (a synthetic flooded-street benchmark generated and cached
under --cache_dir, oracle attention from the flood masks, a random-weight CosPlace ResNet-18/512) in a few minutes
on a CPU. A real evaluation:

    python -m experiments.eval --checkpoint DIR --database_folder D --queries_folder Q \
        --attention_dir A --alphas 0,0.25,0.5,1 --positive_dist_threshold 25 \
        --recall_values 1,5,10,20 --output_dir OUT

writes OUT/results.json, OUT/per_query.csv, OUT/csv_results/alpha_<a>/{individual,aggregated}_results.csv,
OUT/recall_vs_alpha.png and OUT/eval.log (see attllm_jax.evaluation.run_evaluation).

Multi-process (every host runs the same command with its --process_id, see experiments/multihost.py): each
process extracts its share of the database store, then process 0 extracts the queries, searches and writes the
results; process i logs to OUT/eval.process_i.log.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

from absl import flags

from experiments import cli, multihost
from experiments.cli import fail

FLAGS = flags.FLAGS

flags.DEFINE_string("checkpoint", None, "Converted model directory; default: random-weight CosPlace ResNet-18/512.")
flags.DEFINE_string("database_folder", None, "Database images (names @utm_east@utm_north@...@.jpg or a CSV).")
flags.DEFINE_string("queries_folder", None, "Query images (names lat_lon@....jpg, @east@north@...@.jpg or a CSV).")
flags.DEFINE_string("attention_dir", None, "Attention files of the queries (<stem>.json); none = no attention.")
flags.DEFINE_list(
    "alphas",
    None,
    "Blend factors in [0, 1], e.g. 0,0.25,0.5,1 or 0:1:11 (start:stop:count); default 0,0.25,0.5,0.75,1.",
)
flags.DEFINE_float("positive_dist_threshold", 25.0, "Positive radius in metres (boundary included).")
flags.DEFINE_list("recall_values", ["1", "5", "10", "20"], "The N of recall@N.")
flags.DEFINE_string("output_dir", None, "Output folder (default outputs/demo for the demo; required otherwise).")
flags.DEFINE_enum("distance", "utm", ["utm", "haversine"], "Euclidean in one UTM zone, or great circle on lat/lon.")
flags.DEFINE_string("database_csv", None, "Optional CSV path,lat,lon or path,utm_east,utm_north for the database.")
flags.DEFINE_string("queries_csv", None, "Optional coordinates CSV for the queries.")
flags.DEFINE_enum("convention", "auto", ["auto", "sfxl", "flood"], "File-name coordinate convention.")
cli.define_image_size_flag()
flags.DEFINE_integer("batch_size", 8, "Images per device batch (rounded up to a multiple of the device count).")
flags.DEFINE_integer(
    "max_batch_pixels",
    None,
    "Pixel budget of one batch (default: batch_size megapixels); larger shapes get fewer rows, and an image whose "
    "preprocessed size alone exceeds it is skipped and counted.",
)
flags.DEFINE_integer("num_workers", None, "Image decode threads (default: cores, at most 8).")
flags.DEFINE_string(
    "store_dir", None, "Database descriptor store: a directory or a kvstore URL (default OUTPUT_DIR/database_store)."
)
flags.DEFINE_integer(
    "chunk_size", None, "Database images per store chunk, the resume granularity (default 256 on CPU, 4096 else)."
)
flags.DEFINE_enum(
    "store_dtype", "float32", ["float32", "float16"], "Stored descriptor dtype (float16: half the bytes)."
)
flags.DEFINE_float("sigma", 0.2, "RBF width of point attention maps.")
flags.DEFINE_bool("grid_interpolate", False, "Bilinear upsampling of grid answers instead of sharp cells.")
flags.DEFINE_integer("max_points", 8, "Point slots per attention answer.")
flags.DEFINE_integer("num_preds_to_save", 0, "Save, per query and alpha, a strip with the top-K predictions.")
flags.DEFINE_integer("model_seed", 0, "Seed of the random-weight model (without --checkpoint).")
flags.DEFINE_enum(
    "random_model",
    "cosplace",
    ["cosplace", "megaloc", "boq_dinov2", "boq_resnet50", "supervlad", "image4vpr"],
    "Random-weight model without --checkpoint (the demo's): CosPlace ResNet-18/512, or a released MegaLoc / BoQ / "
    "SuperVLAD / ImAge architecture with random weights.",
)
cli.define_precision_flag()
flags.DEFINE_string("cache_dir", "cache", "Where the demo's synthetic benchmark is generated and cached.")
flags.DEFINE_enum(
    "search",
    "auto",
    ["auto", "exact_jax", "faiss_flat", "faiss_ivf", "faiss_hnsw"],
    "Database search: auto = exact_jax on an accelerator, faiss_flat on CPU; faiss_ivf / faiss_hnsw are approximate "
    "(their recall vs exact is measured and written to results.json).",
)
flags.DEFINE_integer("nlist", 0, "faiss_ivf cells (0 = 4 sqrt(N), at most N/39).")
flags.DEFINE_integer("nprobe", 16, "faiss_ivf cells visited per query.")
flags.DEFINE_integer("pq_m", 0, "faiss_ivf product-quantizer sub-vectors (0 = IVF-Flat); must divide the dimension.")
flags.DEFINE_integer("hnsw_m", 32, "faiss_hnsw neighbours per node.")
flags.DEFINE_integer("ef_search", 128, "faiss_hnsw search breadth.")
flags.DEFINE_integer("search_block_size", None, "exact_jax queries per block (default: 256 MiB of scores per device).")
flags.DEFINE_enum(
    "search_shortlist_dtype", None, ["bfloat16"], "exact_jax: low-precision first pass + exact re-rank (approximate)."
)
flags.DEFINE_float("search_memory_gb", None, "Search memory budget in GiB (default: the memory available at start).")


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


flags.register_validator("alphas", _valid_alphas, "--alphas must be distinct numbers in [0, 1] (or start:stop:count)")
flags.register_validator("recall_values", _valid_recall_values, "--recall_values must be distinct integers >= 1")
flags.register_validator(
    "positive_dist_threshold", lambda v: math.isfinite(v) and v > 0, "--positive_dist_threshold must be > 0 metres"
)
for _name in ("batch_size", "chunk_size", "max_points", "nprobe", "hnsw_m", "ef_search"):
    flags.register_validator(_name, lambda v: v is None or v >= 1, f"--{_name} must be >= 1")
flags.register_validator("num_workers", lambda v: v is None or v >= 1, "--num_workers must be >= 1")
flags.register_validator("max_batch_pixels", lambda v: v is None or v >= 1, "--max_batch_pixels must be >= 1")
for _name in ("nlist", "pq_m"):
    flags.register_validator(_name, lambda v: v >= 0, f"--{_name} must be >= 0")
flags.register_validator("search_block_size", lambda v: v is None or v >= 1, "--search_block_size must be >= 1")
flags.register_validator("search_memory_gb", lambda v: v is None or v > 0, "--search_memory_gb must be > 0")
flags.register_validator("num_preds_to_save", lambda v: v >= 0, "--num_preds_to_save must be >= 0")
flags.register_validator("sigma", lambda v: math.isfinite(v) and v > 0, "--sigma must be > 0")


def _overrides() -> dict:
    image_size = cli.image_size_from_flag()
    overrides = {
        "checkpoint": FLAGS.checkpoint,
        "recall_values": tuple(int(v) for v in FLAGS.recall_values),
        "positive_dist_threshold": FLAGS.positive_dist_threshold,
        "distance": FLAGS.distance,
        "convention": FLAGS.convention,
        "batch_size": FLAGS.batch_size,
        "num_workers": FLAGS.num_workers,
        "max_batch_pixels": FLAGS.max_batch_pixels,
        "store_dir": FLAGS.store_dir,
        "chunk_size": FLAGS.chunk_size,
        "store_dtype": FLAGS.store_dtype,
        "sigma": FLAGS.sigma,
        "grid_interpolate": FLAGS.grid_interpolate,
        "max_points": FLAGS.max_points,
        "num_preds_to_save": FLAGS.num_preds_to_save,
        "model_seed": FLAGS.model_seed,
        "random_model": FLAGS.random_model,
        "precision": FLAGS.precision,
        "search": _search_spec(),
    }
    if FLAGS.alphas is not None:
        overrides["alphas"] = tuple(parse_values(FLAGS.alphas))
    if image_size is not None:
        overrides["image_size"] = image_size
    return overrides


def _search_spec():
    from attllm_jax.retrieval.index import FaissParams
    from attllm_jax.retrieval.search import SearchSpec

    faiss_params = FaissParams(
        nlist=FLAGS.nlist, nprobe=FLAGS.nprobe, pq_m=FLAGS.pq_m, hnsw_m=FLAGS.hnsw_m, ef_search=FLAGS.ef_search
    )
    return SearchSpec(
        method=FLAGS.search,
        faiss=faiss_params,
        block_size=FLAGS.search_block_size,
        shortlist_dtype=FLAGS.search_shortlist_dtype,
        memory_gb=FLAGS.search_memory_gb,
    )


def _fail(message: str, usage: bool = False) -> None:
    """Ends the run with one ``eval: error: ...`` line on stderr (and a pointer to --help for usage errors)."""
    fail("eval", message, usage)


def print_runtime(command: str, precision: str) -> None:
    """One stderr line at the start of a command: backend, devices and precision (is the accelerator used?)."""
    from attllm_jax.models.precision import runtime_summary

    print(f"{command}: {runtime_summary(precision)}", file=sys.stderr, flush=True)


def _os_error_line(error: OSError, config) -> str:
    """One line for an OSError: which file, which flag it comes from, and what to do."""
    filename = getattr(error, "filename", None)
    reason = error.strerror or str(error)
    if filename is None:
        return f"{reason}"
    path = os.path.abspath(str(filename))
    flag, what = "--output_dir", "a writable output folder"
    for name, directory in (("--store_dir", config.resolved_store_dir), ("--output_dir", config.output_dir)):
        root = os.path.abspath(str(directory))
        if path == root or path.startswith(root + os.sep):
            flag, what = name, f"a writable folder for {name}"
            break
    else:
        if isinstance(error, FileNotFoundError):
            return f"{filename}: {reason}"
    return f"cannot write {filename} ({reason}): give {what} ({flag})"


def _check_writable(directory: str) -> None:
    """Creates ``directory`` and a temporary file in it, so a read-only output folder fails before any work."""
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass


def config_from_flags(demo_output_dir: str = "outputs/demo", command: str = "eval", **extra):
    """The validated :class:`EvalConfig` of the dataset / model / attention flags (the demo without dataset flags).

    Args:
        demo_output_dir: The demo's output folder when --output_dir is not given.
        command: The command named in error lines (``"tune"`` reuses these flags).
        **extra: Overrides of EvalConfig fields (e.g. another command's alpha grid).

    Inconsistent or invalid flags end the run with one ``<command>: error:`` line and a pointer to --help.
    """
    from attllm_jax.evaluation import EvalConfig

    overrides = {**_overrides(), **extra}
    demo = FLAGS.database_folder is None and FLAGS.queries_folder is None
    if demo:
        from attllm_jax.evaluation.demo import demo_config

        if FLAGS.attention_dir or FLAGS.database_csv or FLAGS.queries_csv:
            fail(command, "--attention_dir / --*_csv need --database_folder and --queries_folder", usage=True)
        config = demo_config(FLAGS.cache_dir, FLAGS.output_dir or demo_output_dir, **overrides)
    else:
        if FLAGS.database_folder is None or FLAGS.queries_folder is None:
            fail(
                command,
                "give both --database_folder and --queries_folder (or neither, for the demo)",
                usage=True,
            )
        if FLAGS.output_dir is None:
            fail(command, "--output_dir is required with --database_folder/--queries_folder", usage=True)
        config = EvalConfig(
            database_folder=FLAGS.database_folder,
            queries_folder=FLAGS.queries_folder,
            output_dir=FLAGS.output_dir,
            attention_dir=FLAGS.attention_dir,
            database_csv=FLAGS.database_csv,
            queries_csv=FLAGS.queries_csv,
            **overrides,
        )
    try:
        return config.validated()
    except (ValueError, FileNotFoundError) as error:
        fail(command, str(error), usage=True)


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}", usage=True)
    from attllm_jax.logs import quiet_library_logs

    quiet_library_logs(FLAGS.verbosity)
    try:
        multihost.join_from_flags()
    except ValueError as error:
        _fail(str(error), usage=True)
    from attllm_jax.data.coordinates import CoordinateError
    from attllm_jax.data.dataset import PathListError
    from attllm_jax.evaluation import run_evaluation
    from attllm_jax.evaluation.pipeline import ModelLoadError
    from attllm_jax.evaluation.report import recall_table
    from attllm_jax.retrieval.search import SearchMemoryError
    from attllm_jax.retrieval.store import StoreError

    config = config_from_flags()
    try:
        _check_writable(config.output_dir)
    except OSError as error:
        _fail(_os_error_line(error, config))
    print_runtime("eval", config.precision)  # after the checks: a run that fails them prints only its error line
    try:
        result = run_evaluation(config)
    except (CoordinateError, PathListError, ModelLoadError, StoreError, SearchMemoryError) as error:
        _fail(str(error))
    except OSError as error:  # read-only or full output / store folder, a file vanished during the run
        _fail(_os_error_line(error, config))
    if result is None:  # a process other than 0 of a multi-process run
        print(f"database share done; process 0 wrote {os.path.join(config.output_dir, 'results.json')}")
        sys.stdout.flush()
        return
    res = result.results
    print()
    for note in res["notes"]:
        print(note)
    print(
        f"{result.model.spec.describe()}, {res['num_database']} database images, {res['num_queries']} queries, "
        f"positives within {res['positive_dist_threshold']:g} m, "
        f"attention on {res['attention']['queries_with_attention']} queries"
    )
    print(f"recall@N (%) per alpha:\n{recall_table(result.retrieval)}")
    skipped = res["num_skipped"]
    if skipped["database"] or skipped["queries"]:
        print(f"skipped unreadable images: {skipped['database']} database, {skipped['queries']} queries")
    print(f"results: {result.output_dir / 'results.json'}")
    sys.stdout.flush()


def help_text() -> str:
    """This module's docstring and its flags."""
    return cli.help_text(__doc__, sys.argv[0] if __name__ == "__main__" else __name__, multihost.__name__)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-eval``, also ``python -m experiments.eval``); ``--help`` exits 0."""
    cli.run_command("eval", main, help_text, argv)


if __name__ == "__main__":
    run()
