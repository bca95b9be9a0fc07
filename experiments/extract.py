r"""Build a database descriptor store on its own: ``python -m experiments.extract``.

    python -m experiments.extract --checkpoint DIR --database_folder D --store_dir S [--store_dtype float16]

A large database is extracted once and evaluated many times: ``python -m experiments.eval --store_dir S ...``
with the same model, database and --image_size reuses the store (its key is the model config, the weights digest,
the resize override and the image list). The store is resumable chunk by chunk: rerun the same command after an
interruption. Prints progress and a final images/s line.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_string("checkpoint", None, "Converted model directory; default: random-weight CosPlace ResNet-18/512.")
flags.DEFINE_string("database_folder", None, "Database images (names @utm_east@utm_north@...@.jpg or a CSV).")
flags.DEFINE_string("database_csv", None, "Optional CSV path,lat,lon or path,utm_east,utm_north for the database.")
flags.DEFINE_enum("convention", "auto", ["auto", "sfxl", "flood"], "File-name coordinate convention.")
flags.DEFINE_list("image_size", None, "Resize override: shorter side (one int) or height,width.")
flags.DEFINE_integer("batch_size", 8, "Images per device batch (rounded up to a multiple of the device count).")
flags.DEFINE_integer("num_workers", None, "Image decode threads (default: cores, at most 8).")
flags.DEFINE_string("store_dir", None, "The store: a directory or a tensorstore kvstore URL (required).")
flags.DEFINE_integer("chunk_size", None, "Images per store chunk (default 256 on CPU, 4096 on an accelerator).")
flags.DEFINE_enum("store_dtype", "float32", ["float32", "float16"], "Stored descriptor dtype.")
flags.DEFINE_integer("model_seed", 0, "Seed of the random-weight model (without --checkpoint).")
flags.DEFINE_enum(
    "precision", "float32", ["float32", "tf32", "bfloat16"], "Model precision (part of the store's key; see README)."
)
flags.mark_flags_as_required(["database_folder", "store_dir"])
for _name in ("batch_size", "chunk_size", "num_workers"):
    flags.register_validator(_name, lambda v: v is None or v >= 1, f"--{_name} must be >= 1")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from attllm_jax.data.coordinates import CoordinateError
    from attllm_jax.data.dataset import load_image_set
    from attllm_jax.evaluation.config import EvalConfig
    from attllm_jax.evaluation.extract import build_database_store
    from attllm_jax.evaluation.pipeline import load_eval_model
    from attllm_jax.evaluation.progress import setup_logging
    from attllm_jax.retrieval.store import StoreError

    image_size = None
    if FLAGS.image_size:
        sizes = [int(v) for v in FLAGS.image_size]
        image_size = sizes[0] if len(sizes) == 1 else tuple(sizes)
    config = EvalConfig(
        database_folder=FLAGS.database_folder,
        queries_folder=FLAGS.database_folder,  # not used: the extraction reads the database only
        output_dir=".",
        checkpoint=FLAGS.checkpoint,
        database_csv=FLAGS.database_csv,
        convention=FLAGS.convention,
        image_size=image_size,
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
    setup_logging(None)
    t0 = time.perf_counter()
    try:
        database = load_image_set(config.database_folder, config.convention, config.database_csv)
        model = load_eval_model(config)
        store, summary = build_database_store(
            model,
            database,
            config.resolved_store_dir,
            chunk_size=config.resolved_chunk_size,
            store_dtype=config.store_dtype,
            batch_size=config.batch_size,
            image_size=config.image_size,
            num_workers=config.num_workers,
            max_batch_pixels=config.max_batch_pixels,
        )
        store.close()
    except (CoordinateError, StoreError, FileNotFoundError) as error:
        print(f"extract: error: {error}", file=sys.stderr)
        sys.exit(1)
    seconds = time.perf_counter() - t0
    rate = summary.images_computed / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"store {store.directory}: {summary.status}, {summary.chunks_computed} of {summary.chunks_total} chunks "
        f"computed, {summary.images_computed} images in {summary.seconds:.1f} s ({rate:.2f} images/s; "
        f"{seconds:.1f} s in all)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
