r"""Place photos without coordinates on a map: ``attllm-localize`` (or ``python -m experiments.localize``).

With no dataset flags it runs on the demo: the synthetic database, and its flooded query views copied under names
without coordinates (photo_NNN.jpg) with their oracle attention. A real run:

    attllm-localize --images PHOTOS --database_folder DB --checkpoint MODEL --attention_dir A --alpha 0.5 \
        --calibration C.json --output_dir OUT

writes OUT/localizations.geojson, OUT/localizations.csv, OUT/localizations.kml, OUT/localize_summary.json,
OUT/localize.log and one OUT/photos/<photo>.json per photo (a rerun with the same settings skips those).
Calibrate first from a labelled eval run: --calibrate_with EVAL_OUT (or attllm-eval --calibration_out C.json).
"""

from __future__ import annotations

import math
import os
import sys

from absl import flags

from experiments import cli, flagdefs
from experiments.cli import fail

FLAGS = flags.FLAGS

flags.DEFINE_string("images", None, "Folder of photos to localize (nested folders allowed); default: the demo's.")
flags.DEFINE_string("utm_zone", None, "UTM zone of plain-UTM database names, e.g. 10S.")
flagdefs.define(
    "database_folder",
    "database_csv",
    "store_dir",
    "convention",
    "checkpoint",
    "random_model",
    "model_seed",
    "precision",
    "image_size",
    "batch_size",
    "cache_dir",
)
flags.DEFINE_string(
    "attention_dir", None, "Attention files of the photos (annotate's <stem>.json); none = no attention."
)
flags.DEFINE_float("alpha", None, "Attention blend factor in [0, 1] (default 0.5 with attention, else 0).")
flags.DEFINE_float("sigma", 0.2, "RBF width of point attention maps.")
flags.DEFINE_integer("top_k", 10, "Database candidates kept per photo.")
flags.DEFINE_enum(
    "estimator",
    "top1",
    ["top1", "cluster"],
    "top1: the best match; cluster: score-weighted centre of the largest cluster of the top-K within --cluster_radius.",
)
flags.DEFINE_float("cluster_radius", 25.0, "Cluster radius of --estimator cluster, metres.")
flags.DEFINE_float("radius", 25.0, "The confidence is P(estimate within this many metres of the truth).")
flags.DEFINE_string("calibration", None, "Calibration JSON (attllm-eval --calibration_out); none = uncalibrated.")
flags.DEFINE_string(
    "calibrate_with",
    None,
    "Fit the calibration from this eval output folder first (results.json, "
    "per_query.csv), write it to OUT/calibration.json and use it.",
)
flags.DEFINE_integer("chunk_photos", 32, "Photos searched and written before the next ones are read (resume unit).")
flags.DEFINE_string("output_dir", None, "Output folder (default outputs/localize_demo for the demo; required else).")
flags.DEFINE_string(
    "basemap_url",
    None,
    "Optional tile template for report.html, e.g. https://tile.example/{z}/{x}/{y}.png "
    "(the page then fetches tiles; without it the report makes no network request).",
)
flags.DEFINE_bool(
    "watch",
    False,
    "Keep the model loaded and localize photos as they appear in --images (until "
    "interrupted); a file is read once its size and time stop changing for --settle seconds.",
)
flags.DEFINE_float("poll", 1.0, "--watch: seconds between looks at the folder.")
flags.DEFINE_float("settle", 2.0, "--watch: seconds a new file must stay unchanged before it is read.")
flags.register_validator(
    "alpha", lambda v: v is None or (math.isfinite(v) and 0 <= v <= 1), "--alpha must lie in [0, 1]"
)
flags.register_validator("top_k", lambda v: v >= 1, "--top_k must be >= 1")
flags.register_validator("chunk_photos", lambda v: v >= 1, "--chunk_photos must be >= 1")
for _name in ("cluster_radius", "radius", "sigma"):
    flags.register_validator(_name, lambda v: math.isfinite(v) and v > 0, f"--{_name} must be > 0")


def settings_from_flags():
    """The :class:`LocalizeSettings` of the flags (the demo without --images / --database_folder)."""
    from attllm_jax.localization import LocalizeSettings

    images, database, attention, output = FLAGS.images, FLAGS.database_folder, FLAGS.attention_dir, FLAGS.output_dir
    if images is None and database is None:
        from attllm_jax.evaluation.demo import DEMO_IMAGE_SIZE
        from attllm_jax.localization.demo import prepare_localize_demo

        if attention or FLAGS.database_csv:
            fail("localize", "--attention_dir / --database_csv need --images and --database_folder", usage=True)
        database, images, attention = (str(p) for p in prepare_localize_demo(FLAGS.cache_dir))
        output = output or "outputs/localize_demo"
        image_size = flagdefs.image_size() or DEMO_IMAGE_SIZE
    elif images is None or database is None or output is None:
        fail("localize", "give --images, --database_folder and --output_dir (or none of them, for the demo)", True)
    else:
        image_size = flagdefs.image_size()
    alpha = FLAGS.alpha if FLAGS.alpha is not None else (0.5 if attention else 0.0)
    return LocalizeSettings(
        images=images,
        output_dir=output,
        database_folder=database,
        database_csv=FLAGS.database_csv,
        store_dir=FLAGS.store_dir,
        utm_zone=FLAGS.utm_zone,
        checkpoint=FLAGS.checkpoint,
        random_model=FLAGS.random_model,
        model_seed=FLAGS.model_seed,
        precision=FLAGS.precision,
        image_size=image_size,
        attention_dir=attention,
        alpha=alpha,
        sigma=FLAGS.sigma,
        top_k=FLAGS.top_k,
        estimator=FLAGS.estimator,
        cluster_radius_m=FLAGS.cluster_radius,
        radius_m=FLAGS.radius,
        calibration=FLAGS.calibration,
        batch_size=FLAGS.batch_size,
        chunk_photos=FLAGS.chunk_photos,
        convention=FLAGS.convention,
    )


def main(argv):
    if len(argv) > 1:
        fail("localize", f"unexpected arguments: {argv[1:]}", usage=True)
    from dataclasses import replace

    from attllm_jax.data.coordinates import CoordinateError
    from attllm_jax.data.dataset import PathListError
    from attllm_jax.evaluation.pipeline import ModelLoadError
    from attllm_jax.evaluation.progress import setup_logging
    from attllm_jax.localization import api
    from attllm_jax.localization.calibrate_eval import calibrate_from_eval
    from attllm_jax.retrieval.store import StoreError

    settings = settings_from_flags()
    try:
        settings = settings.validated()
        api.list_photos(settings.images, settings.output_dir)
        from attllm_jax.data.dataset import load_image_set
        from attllm_jax.localization.geo import database_zone

        database = load_image_set(settings.database_folder, settings.convention, settings.database_csv)
        database_zone(database, settings.utm_zone)  # one line before any work when no zone is known
    except (ValueError, FileNotFoundError) as error:
        fail("localize", str(error))
    out = api.claim_output_dir(settings.output_dir)
    setup_logging(out / "localize.log")
    try:
        if FLAGS.calibrate_with:
            calibration = calibrate_from_eval(
                FLAGS.calibrate_with,
                settings.radius_m,
                settings.estimator,
                settings.cluster_radius_m,
                alpha=settings.alpha,
            )
            calibration.save(out / "calibration.json")
            settings = replace(settings, calibration=str(out / "calibration.json"))
        if FLAGS.watch:
            _watch(settings, out)
            return
        run = api.localize(settings)
    except (CoordinateError, PathListError, ModelLoadError, StoreError, ValueError, FileNotFoundError) as error:
        fail("localize", str(error))
    _write_all(out, run, settings)
    print(
        f"{len(run.photos)} photos localized ({run.computed} computed, {run.reused} reused, "
        f"{len(run.skipped)} skipped); confidence: {'calibrated' if run.calibration else 'uncalibrated'}"
    )
    print(f"results: {os.path.join(settings.output_dir, 'localizations.geojson')}")
    sys.stdout.flush()


def _write_all(out, run, settings) -> None:
    from attllm_jax.localization.report import write_report
    from attllm_jax.localization.writers import summary_dict, write_outputs

    extra = {"alpha": settings.alpha, "model": settings.checkpoint or f"random {settings.random_model}"}
    write_outputs(out, run.photos, summary_dict(run, settings), extra)
    write_report(out, run, settings, FLAGS.basemap_url)


def _watch(settings, out) -> None:
    """Localizes settled new photos every --poll seconds with one loaded model, rewriting the outputs atomically."""
    import time

    from attllm_jax.evaluation.pipeline import load_eval_model
    from attllm_jax.localization import api

    model = load_eval_model(settings.eval_config())
    settled, done = api.SettledFiles(FLAGS.settle), None
    print(f"watching {settings.images} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            ready = settled.poll(settings.images, settings.output_dir)
            if ready and ready != done:
                run = api.localize(settings, model=model, photos=ready)
                _write_all(out, run, settings)
                done = ready
                print(f"{len(run.photos)} photos localized ({run.computed} new)", flush=True)
            time.sleep(FLAGS.poll)
    except KeyboardInterrupt:
        print("stopped", flush=True)


def help_text() -> str:
    """This module's docstring and its flags."""
    return cli.help_text(__doc__, flagdefs.module_key(__name__))


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-localize``, also ``python -m experiments.localize``)."""
    cli.run_command("localize", main, help_text, argv)


if __name__ == "__main__":
    run()
