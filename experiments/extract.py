r"""Build a database descriptor store on its own: ``python -m experiments.extract``.

    python -m experiments.extract --checkpoint DIR --database_folder D --store_dir S [--store_dtype float16]
    python -m experiments.extract --store_dir S     # the demo's database, as attllm-eval's demo extracts it

A large database is extracted once and evaluated many times: ``python -m experiments.eval --store_dir S ...``
with the same model, database and --image_size reuses the store (its key is the model config, the weights digest,
the resize override and the image list). The store is resumable chunk by chunk: rerun the same command after an
interruption. Prints progress and a final images/s line.

Every host of a multi-process run runs the same command with its --process_id (see experiments/multihost.py and
attllm_jax.evaluation.hosts); each extracts its share of the chunks into the one store, which must be on storage
they all see. With --logs_dir, process 0 logs to LOGS_DIR/extract.log and process i to LOGS_DIR/extract.process_i.log.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

from experiments import cli, flagdefs, multihost

FLAGS = flags.FLAGS

flagdefs.define(
    "checkpoint",
    "random_model",
    "database_folder",
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
)
flags.DEFINE_string("logs_dir", None, "Per-process log files go here (default: stderr only).")
flags.mark_flag_as_required("store_dir")


def _config():
    """The validated EvalConfig of the flags: the demo's database (its image size and model) without
    --database_folder, so that ``attllm-eval --store_dir S`` on the demo reuses the store."""
    from attllm_jax.evaluation.config import EvalConfig
    from attllm_jax.evaluation.demo import demo_config

    settings = {
        "checkpoint": FLAGS.checkpoint,
        "random_model": FLAGS.random_model,
        "convention": FLAGS.convention,
        "batch_size": FLAGS.batch_size,
        "num_workers": FLAGS.num_workers,
        "store_dir": FLAGS.store_dir,
        "chunk_size": FLAGS.chunk_size,
        "store_dtype": FLAGS.store_dtype,
        "model_seed": FLAGS.model_seed,
        "precision": FLAGS.precision,
    }
    if flagdefs.image_size() is not None:
        settings["image_size"] = flagdefs.image_size()
    if FLAGS.database_folder is None:
        if FLAGS.database_csv:
            raise app.UsageError("--database_csv needs --database_folder")
        config = demo_config(FLAGS.cache_dir, ".", **settings)
        print(f"extract: the demo's database ({config.database_folder})", file=sys.stderr, flush=True)
    else:
        config = EvalConfig(
            database_folder=FLAGS.database_folder,
            queries_folder=FLAGS.database_folder,  # not used: the extraction reads the database only
            output_dir=".",
            database_csv=FLAGS.database_csv,
            **settings,
        )
    try:
        return config.validated()
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from attllm_jax.evaluation.hosts import CoordinationError

    try:
        multihost.join_from_flags()
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    except CoordinationError as error:
        cli.fail("extract", str(error))
    from attllm_jax.data.coordinates import CoordinateError
    from attllm_jax.evaluation import hosts
    from attllm_jax.evaluation.extract import NonFiniteDescriptorError
    from attllm_jax.evaluation.pipeline import run_extraction
    from attllm_jax.retrieval.store import StoreError

    config = _config()
    cli.print_runtime("extract", config.precision)
    t0 = time.perf_counter()
    try:
        directory, summary = run_extraction(config, log_dir=FLAGS.logs_dir)
    except (CoordinateError, StoreError, FileNotFoundError, NonFiniteDescriptorError, CoordinationError) as error:
        cli.fail("extract", str(error))
    seconds = time.perf_counter() - t0
    who = f"process {hosts.process_index()}: " if hosts.process_count() > 1 else ""
    rate = summary.images_computed / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"{who}store {directory}: {summary.status}, {summary.chunks_computed} of {summary.chunks_total} chunks "
        f"computed, {summary.images_computed} images in {summary.seconds:.1f} s ({rate:.2f} images/s; "
        f"{seconds:.1f} s in all)"
    )
    if hosts.process_count() > 1 and hosts.process_index() == 0:
        images = summary.all_images_computed
        print(
            f"all {hosts.process_count()} processes: {summary.all_chunks_computed} chunks, {images} images in "
            f"{seconds:.1f} s ({images / seconds:.2f} images/s)"
        )
    sys.stdout.flush()


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-extract``, also ``python -m experiments.extract``); ``--help`` exits 0."""
    cli.run_command("extract", main, cli.module_help(__doc__, __name__, multihost.__name__), argv)


if __name__ == "__main__":
    run()
