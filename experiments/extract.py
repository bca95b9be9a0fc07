r"""Build a database descriptor store on its own: ``python -m experiments.extract``.

    python -m experiments.extract --checkpoint DIR --database_folder D --store_dir S [--store_dtype float16]

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

from experiments import cli, multihost

FLAGS = flags.FLAGS

flags.DEFINE_string("checkpoint", None, "Converted model directory; default: random-weight CosPlace ResNet-18/512.")
flags.DEFINE_string("database_folder", None, "Database images (names @utm_east@utm_north@...@.jpg or a CSV).")
flags.DEFINE_string("database_csv", None, "Optional CSV path,lat,lon or path,utm_east,utm_north for the database.")
flags.DEFINE_enum("convention", "auto", ["auto", "sfxl", "flood"], "File-name coordinate convention.")
cli.define_image_size_flag()
flags.DEFINE_integer("batch_size", 8, "Images per device batch (rounded up to a multiple of the device count).")
flags.DEFINE_integer("num_workers", None, "Image decode threads (default: cores, at most 8).")
flags.DEFINE_string("store_dir", None, "The store: a directory or a tensorstore kvstore URL (required).")
flags.DEFINE_integer("chunk_size", None, "Images per store chunk (default 256 on CPU, 4096 on an accelerator).")
flags.DEFINE_enum("store_dtype", "float32", ["float32", "float16"], "Stored descriptor dtype.")
flags.DEFINE_integer("model_seed", 0, "Seed of the random-weight model (without --checkpoint).")
flags.DEFINE_string("logs_dir", None, "Per-process log files go here (default: stderr only).")
cli.define_precision_flag()
flags.mark_flags_as_required(["database_folder", "store_dir"])
for _name in ("batch_size", "chunk_size", "num_workers"):
    flags.register_validator(_name, lambda v: v is None or v >= 1, f"--{_name} must be >= 1")


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
    from attllm_jax.evaluation.config import EvalConfig
    from attllm_jax.evaluation.extract import NonFiniteDescriptorError
    from attllm_jax.evaluation.pipeline import run_extraction
    from attllm_jax.retrieval.store import StoreError

    config = EvalConfig(
        database_folder=FLAGS.database_folder,
        queries_folder=FLAGS.database_folder,  # not used: the extraction reads the database only
        output_dir=".",
        checkpoint=FLAGS.checkpoint,
        database_csv=FLAGS.database_csv,
        convention=FLAGS.convention,
        image_size=cli.image_size_from_flag(),
        batch_size=FLAGS.batch_size,
        num_workers=FLAGS.num_workers,
        store_dir=FLAGS.store_dir,
        chunk_size=FLAGS.chunk_size,
        store_dtype=FLAGS.store_dtype,
        model_seed=FLAGS.model_seed,
        precision=FLAGS.precision,
    )
    try:
        config = config.validated()
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from None
    from attllm_jax.models.precision import runtime_summary

    print(f"extract: {runtime_summary(config.precision)}", file=sys.stderr, flush=True)
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
    module = sys.argv[0] if __name__ == "__main__" else __name__
    cli.run_command("extract", main, lambda: cli.help_text(__doc__, module, multihost.__name__), argv)


if __name__ == "__main__":
    run()
