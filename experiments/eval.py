r"""Evaluate flood-query geo-localization for every alpha: ``attllm-eval`` (or ``python -m experiments.eval``).

With no dataset flags it runs the self-contained demo (a synthetic flooded-street benchmark generated and cached
under --cache_dir, by default $ATTLLM_JAX_CACHE or ~/.cache/attllm_jax; oracle attention from the flood masks; a
random-weight CosPlace ResNet-18/512) in a few minutes on a CPU, into outputs/demo (--output_dir). --alphas
defaults to 0,0.25,0.5,0.75,1. A real evaluation:

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

import errno
import math
import os
import sys
import tempfile

from absl import flags

from experiments import cli, flagdefs, multihost
from experiments.cli import fail

FLAGS = flags.FLAGS

flagdefs.define(
    "checkpoint",
    "random_model",
    "database_folder",
    "queries_folder",
    "database_csv",
    "convention",
    "image_size",
    "precision",
    "batch_size",
    "num_workers",
    "store_dir",
    "chunk_size",
    "store_dtype",
    "model_seed",
    "cache_dir",
    "alphas",
    "recall_values",
    "positive_dist_threshold",
    "rerank",
    "save_descriptors",
    "alpha_policy",
)
flags.DEFINE_string(
    "attention_dir",
    None,
    "Attention files of the queries (<stem>.json); none = no attention. A,B,...: every folder and their mean map "
    "(the ensemble) are evaluated in one run (results.json attention_sources); the top-level results are A's.",
)
flags.DEFINE_string("output_dir", None, "Output folder (default outputs/demo for the demo; required otherwise).")
flags.DEFINE_enum("distance", "utm", ["utm", "haversine"], "Euclidean in one UTM zone, or great circle on lat/lon.")
flags.DEFINE_string("queries_csv", None, "Optional coordinates CSV for the queries.")
flags.DEFINE_integer(
    "max_batch_pixels",
    None,
    "Pixel budget of one batch (default: batch_size megapixels); larger shapes get fewer rows, and an image whose "
    "preprocessed size alone exceeds it is skipped and counted.",
)
flags.DEFINE_float("sigma", 0.2, "RBF width of point attention maps.")
flags.DEFINE_bool("grid_interpolate", False, "Bilinear upsampling of grid answers instead of sharp cells.")
flags.DEFINE_integer("max_points", 8, "Point slots per attention answer.")
flags.DEFINE_integer("num_preds_to_save", 0, "Save, per query and alpha, a strip with the top-K predictions.")
flags.DEFINE_enum(
    "search",
    "auto",
    ["auto", "exact_jax", "approx_tpu", "faiss_flat", "faiss_ivf", "faiss_hnsw"],
    "Database search: auto = exact_jax on an accelerator, faiss_flat on CPU; approx_tpu (lax.approx_max_k per "
    "shard, exact off TPU), faiss_ivf and faiss_hnsw are approximate (their recall vs exact is measured and written "
    "to results.json). In a multi-process run exact_jax and approx_tpu search on every device of every process.",
)
flags.DEFINE_float("search_recall_target", None, "approx_tpu: recall target of lax.approx_max_k (default 0.95).")
flags.DEFINE_integer("nlist", 0, "faiss_ivf cells (0 = 4 sqrt(N), at most N/39).")
flags.DEFINE_integer("nprobe", 16, "faiss_ivf cells visited per query.")
flags.DEFINE_integer("pq_m", 0, "faiss_ivf product-quantizer sub-vectors (0 = IVF-Flat); must divide the dimension.")
flags.DEFINE_integer("hnsw_m", 32, "faiss_hnsw neighbours per node.")
flags.DEFINE_integer("ef_search", 128, "faiss_hnsw search breadth.")
flags.DEFINE_integer("search_block_size", None, "exact_jax queries per block (default: 256 MiB of scores per device).")
flags.DEFINE_enum(
    "search_shortlist_dtype", None, ["bfloat16"], "exact_jax: low-precision first pass + exact re-rank (approximate)."
)
flags.DEFINE_string(
    "calibration_out",
    None,
    "Also fit attllm-localize's confidence on this labelled run (top-1 estimate, radius --positive_dist_threshold, "
    "the first of --alphas) and write it to this JSON file.",
)
flags.DEFINE_integer(
    "symmetric_k",
    0,
    "Shortlist-symmetric attention: database-side attention on each query's top-k only, annotated once per database "
    "image (cached in --db_attention_dir), described again at --alpha_db and re-ranked (0 = off).",
)
flags.DEFINE_float("alpha_db", 0.5, "Blend factor of the database-side attention (--symmetric_k).")
flags.DEFINE_string(
    "db_attention_dir", None, "The --symmetric_k cache of database attention files (OUTPUT_DIR/database_attention)."
)
flags.DEFINE_string(
    "db_masks", None, "Masks of the database images (<stem>.png): the masks oracle answers the images not cached yet."
)
flags.DEFINE_integer(
    "demo_clutter", 0, "Demo only: parked cars and people per database view, with oracle masks (0 = the default demo)."
)
flags.register_validator("demo_clutter", lambda v: v >= 0, "--demo_clutter must be >= 0")
flags.DEFINE_enum(
    "db_provider",
    None,
    ["gemini", "openai"],
    "--symmetric_k: the LLM that annotates the shortlisted database images not cached yet (key from GEMINI_API_KEY "
    "/ OPENAI_API_KEY, as attllm-annotate); instead of --db_masks.",
)
flagdefs.define_llm_flags("db_", workers=4, item="image")
flags.DEFINE_bool(
    "chain_stages",
    False,
    "All stages chained: each --rerank stage's ranking re-ranked by --symmetric_k (scored with the expanded "
    "queries), then --alpha_policy (results.json chained; each stage's own entry is unchanged).",
)
flags.DEFINE_float("llm_cost_per_1000", None, "Price of 1000 LLM calls, for the --symmetric_k cost model.")
flags.DEFINE_float("search_memory_gb", None, "Search memory budget in GiB (default: the memory available at start).")


parse_values = flagdefs.parse_values  # the list / start:stop:count forms of --alphas, --sigmas


for _name in ("max_points", "nprobe", "hnsw_m", "ef_search"):
    flags.register_validator(_name, lambda v: v is None or v >= 1, f"--{_name} must be >= 1")
flags.register_validator("max_batch_pixels", lambda v: v is None or v >= 1, "--max_batch_pixels must be >= 1")
for _name in ("nlist", "pq_m"):
    flags.register_validator(_name, lambda v: v >= 0, f"--{_name} must be >= 0")
flags.register_validator("search_block_size", lambda v: v is None or v >= 1, "--search_block_size must be >= 1")
flags.register_validator("search_memory_gb", lambda v: v is None or v > 0, "--search_memory_gb must be > 0")
flags.register_validator("symmetric_k", lambda v: v >= 0, "--symmetric_k must be >= 0")
flags.register_validator("alpha_db", lambda v: math.isfinite(v) and 0 <= v <= 1, "--alpha_db must lie in [0, 1]")
flags.register_validator("num_preds_to_save", lambda v: v >= 0, "--num_preds_to_save must be >= 0")
flags.register_validator("sigma", lambda v: math.isfinite(v) and v > 0, "--sigma must be > 0")


def _overrides() -> dict:
    image_size = flagdefs.image_size()
    overrides = {
        "checkpoint": FLAGS.checkpoint,
        "recall_values": flagdefs.recall_values(),
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
        "save_descriptors": FLAGS.save_descriptors,
        "rerank": tuple(FLAGS.rerank),
        "alpha_policy": FLAGS.alpha_policy,
        "symmetric_k": FLAGS.symmetric_k,
        "alpha_db": FLAGS.alpha_db,
        "db_attention_dir": FLAGS.db_attention_dir,
        "db_masks": FLAGS.db_masks,
        "llm_cost_per_1000": FLAGS.llm_cost_per_1000,
        "chain_stages": FLAGS.chain_stages,
        "db_provider": flagdefs.llm_source_settings("db_"),
        "db_city": FLAGS.db_city or "unknown",
        "db_prompt": FLAGS.db_prompt,
        "db_workers": FLAGS.db_workers,
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
        recall_target=FLAGS.search_recall_target,
    )


def _fail(message: str, usage: bool = False) -> None:
    """Ends the run with one ``eval: error: ...`` line on stderr (and a pointer to --help for usage errors)."""
    fail("eval", message, usage)


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
    if error.errno == errno.ENOSPC:
        return f"cannot write {filename} ({reason}): free space on that disk or give another {flag}"
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
        config = demo_config(
            FLAGS.cache_dir, FLAGS.output_dir or demo_output_dir, demo_clutter=FLAGS.demo_clutter, **overrides
        )
    else:
        if FLAGS.demo_clutter:
            fail(command, "--demo_clutter is for the demo (no --database_folder / --queries_folder)", usage=True)
        if FLAGS.database_folder is None or FLAGS.queries_folder is None:
            fail(
                command,
                "give both --database_folder and --queries_folder (or neither, for the demo)",
                usage=True,
            )
        if FLAGS.output_dir is None:
            fail(command, "--output_dir is required with --database_folder/--queries_folder", usage=True)
        dirs = _attention_dirs(command)
        config = EvalConfig(
            database_folder=FLAGS.database_folder,
            queries_folder=FLAGS.queries_folder,
            output_dir=FLAGS.output_dir,
            attention_dir=dirs[0] if dirs else None,
            attention_dirs=dirs if len(dirs) > 1 else (),
            database_csv=FLAGS.database_csv,
            queries_csv=FLAGS.queries_csv,
            **overrides,
        )
    try:
        config = config.validated()
        config.check_output_outside_inputs()
    except (ValueError, FileNotFoundError) as error:
        fail(command, str(error), usage=True)
    if demo:
        print(
            f"{command}: the demo: synthetic benchmark cached under {os.path.abspath(FLAGS.cache_dir)} "
            f"(--cache_dir), outputs in {os.path.abspath(config.output_dir)} (--output_dir)",
            file=sys.stderr,
            flush=True,
        )
    return config


def _attention_dirs(command: str) -> tuple[str, ...]:
    """The folders of ``--attention_dir A,B`` (one for a plain folder); an empty entry, or several folders for a
    command that takes one, ends the run with one error line."""
    text = FLAGS.attention_dir
    if text is None:
        return ()
    dirs = tuple(d.strip() for d in text.split(","))
    if len(dirs) == 1:
        return (text,)  # a single folder is taken as given, as before
    empty = [i + 1 for i, d in enumerate(dirs) if not d]
    if empty:
        fail(command, f"--attention_dir {text!r}: entry {empty[0]} is empty (give folders separated by commas)", True)
    if command != "eval":
        fail(command, f"--attention_dir {text!r}: {command} takes one attention folder (eval takes several)", True)
    return dirs


def _discard_failed_log(output_dir: str, created: bool) -> None:
    """After a failed run: removes the eval.log it wrote, and the output folder when the run created it and it is
    now empty, so that a failure leaves nothing behind (its one error line says what went wrong)."""
    import logging

    log_file = os.path.abspath(os.path.join(output_dir, "eval.log"))
    for logger in (logging.getLogger(), logging.getLogger("attllm_jax")):
        for handler in list(logger.handlers):
            if getattr(handler, "baseFilename", None) == log_file:
                logger.removeHandler(handler)
                handler.close()
    try:
        os.remove(log_file)
        if created:
            os.rmdir(output_dir)  # only when empty
    except OSError:
        pass


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}", usage=True)
    from attllm_jax.logs import quiet_library_logs

    quiet_library_logs(FLAGS.verbosity)
    from attllm_jax.evaluation.hosts import CoordinationError, process_index

    try:
        multihost.join_from_flags()
    except ValueError as error:
        _fail(str(error), usage=True)
    except CoordinationError as error:
        _fail(str(error))
    from attllm_jax.data.coordinates import CoordinateError
    from attllm_jax.data.dataset import PathListError
    from attllm_jax.evaluation import run_evaluation
    from attllm_jax.evaluation.extract import NonFiniteDescriptorError
    from attllm_jax.evaluation.pipeline import ModelLoadError
    from attllm_jax.evaluation.report import recall_table
    from attllm_jax.outputs import OutputLockError, check_free
    from attllm_jax.retrieval.search import SearchMemoryError
    from attllm_jax.retrieval.store import StoreError

    config = config_from_flags()
    if cli.backend_error():  # before the output folder is created
        cli.print_runtime("eval", config.precision)
    created = not os.path.exists(config.output_dir)
    try:
        _check_writable(config.output_dir)
        if process_index() == 0:  # process 0 takes the folder for the run; the others only log into it
            check_free(config.output_dir, "eval")
    except OSError as error:
        _fail(_os_error_line(error, config))
    except OutputLockError as error:
        _fail(str(error))
    cli.print_runtime("eval", config.precision)  # after the checks: a run that fails them prints only its error line
    try:
        result = run_evaluation(config)
    except (
        CoordinateError,
        PathListError,
        ModelLoadError,
        StoreError,
        SearchMemoryError,
        NonFiniteDescriptorError,
        OutputLockError,
        CoordinationError,
    ) as error:
        _discard_failed_log(config.output_dir, created)
        _fail(str(error))
    except OSError as error:  # read-only or full output / store folder, a file vanished during the run
        _discard_failed_log(config.output_dir, created)
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
    if "attention_sources" in res:
        print(_sources_table(res["attention_sources"], res["recall_values"]))
    skipped = res["num_skipped"]
    if skipped["database"] or skipped["queries"]:
        print(f"skipped unreadable images: {skipped['database']} database, {skipped['queries']} queries")
    print(f"results: {result.output_dir / 'results.json'}")
    if FLAGS.calibration_out:
        _write_calibration(config)
    sys.stdout.flush()


def _sources_table(entry: dict, recall_values: list[int]) -> str:
    """One line per attention source and the ensemble: R@N per alpha (results.json ``attention_sources``)."""
    rows = [(part["attention_dir"], part["recalls"]) for part in entry["per_source"]]
    rows.append(("ensemble (mean map)", entry["ensemble"]["recalls"]))
    lines = [f"recall@N (%) per attention source, alpha: R@{'/'.join(str(n) for n in recall_values)}"]
    for name, recalls in rows:
        cells = ", ".join(f"{a}: " + "/".join(f"{v:.1f}" for v in row.values()) for a, row in recalls.items())
        lines.append(f"  {name}: {cells}")
    return "\n".join(lines)


def _write_calibration(config) -> None:
    """Fits the localize confidence on this run's per_query.csv (see attllm_jax.localization.calibrate_eval)."""
    from attllm_jax.localization.calibrate_eval import calibrate_from_eval

    try:
        calibration = calibrate_from_eval(config.output_dir, config.positive_dist_threshold, alpha=config.alphas[0])
    except ValueError as error:
        _fail(f"--calibration_out: {error}")
    calibration.save(FLAGS.calibration_out)
    q = calibration.quality
    held_out = f"ECE {q['ece']:.3f}, Brier {q['brier']:.3f}, AUROC {q['auroc']}"
    print(f"calibration: {FLAGS.calibration_out} (held out: {held_out})")


def help_text() -> str:
    """This module's docstring and its flags (its own and the shared ones it uses)."""
    return cli.help_text(__doc__, flagdefs.module_key(__name__), multihost.__name__)


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-eval``, also ``python -m experiments.eval``); ``--help`` exits 0."""
    cli.run_command("eval", main, help_text, argv)


if __name__ == "__main__":
    run()
