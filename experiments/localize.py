r"""Place photos without coordinates on a map: ``attllm-localize`` (or ``python -m experiments.localize``).

With no dataset flags it runs on the demo: the synthetic database, and its flooded query views copied under names
without coordinates (photo_NNN.jpg) with their oracle attention. A real run:

    attllm-localize --images PHOTOS --database_folder DB --checkpoint MODEL --attention_dir A --alpha 0.5 \
        --calibration C.json --output_dir OUT

writes OUT/localizations.geojson, OUT/localizations.csv, OUT/localizations.kml, OUT/localize_summary.json,
OUT/localize.log and one OUT/photos/<photo>.json per photo (a rerun with the same settings skips those).
Calibrate first from a labelled eval run: --calibrate_with EVAL_OUT (or attllm-eval --calibration_out C.json).

Attention on the fly instead of --attention_dir: --provider gemini|openai|masks|none asks each photo's attention
through annotate's providers and request policy (--qpm, --workers requests in flight, retries), stores the answers
in OUT/attention as attllm-annotate does (a rerun does not ask again), and localizes the photos whose answers are
in while the other requests are in flight. The blend: --alpha/--sigma/--blend, or --tuning OUT/tuning.json (what
attllm-tune chose). One run per output folder: a second one is refused, naming the holder.

--rerank aqe:k=5,w=0.8 (or alpha_qe:k=5,alpha=3; one stage, k <= --top_k): each photo's descriptor is expanded with
its top-k matches and searched again; the estimate, confidence and matches come from that second search.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from experiments import cli, flagdefs
from experiments.cli import fail

FLAGS = flags.FLAGS

flags.DEFINE_string("images", None, "Folder of photos to localize (nested folders allowed); default: the demo's.")
flagdefs.define(*flagdefs.LOCALIZE_MODEL_FLAGS, "batch_size", "rerank", *flagdefs.LOCALIZE_FLAGS)
flags.DEFINE_string(
    "attention_dir", None, "Attention files of the photos (annotate's <stem>.json); none = no attention."
)
flags.DEFINE_enum(
    "provider",
    None,
    ["gemini", "openai", "masks", "none"],
    "Ask each photo's attention on the fly (stored in OUT/attention as annotate stores it); none: no attention.",
)
flagdefs.define_llm_flags("", workers=8, item="photo")
flags.DEFINE_string("masks", None, "--provider masks: folder of water masks (<stem>.png, 255 = water).")
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
flags.register_validator("chunk_photos", lambda v: v >= 1, "--chunk_photos must be >= 1")


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
    ask = ask_from_flags()
    if ask is not None:
        if FLAGS.attention_dir:
            fail("localize", "give --attention_dir (stored answers) or --provider (ask on the fly), not both", True)
        attention = None
    alpha, sigma, blend = cli.blend_from_flags(
        "localize", 0.5 if attention is not None or (ask is not None and ask.asks) else 0.0
    )
    return LocalizeSettings(
        images=images,
        output_dir=output,
        database_folder=database,
        image_size=image_size,
        attention_dir=attention,
        alpha=alpha,
        sigma=sigma,
        blend=blend,
        ask=ask,
        batch_size=FLAGS.batch_size,
        chunk_photos=FLAGS.chunk_photos,
        rerank=rerank_from_flags(),
        **flagdefs.localize_fields(),
    )


def rerank_from_flags() -> str | None:
    """The one --rerank stage of localize, or None (each value was parsed by the flag's validator)."""
    if len(FLAGS.rerank) > 1:
        fail("localize", f"--rerank: localize runs one stage, got {len(FLAGS.rerank)} ({', '.join(FLAGS.rerank)})")
    if FLAGS.rerank and FLAGS.calibrate_with:
        fail("localize", "--calibrate_with fits on eval's plain search; it cannot calibrate --rerank scores")
    return FLAGS.rerank[0] if FLAGS.rerank else None


def ask_from_flags():
    """The :class:`~attllm_jax.localization.ask.AskSettings` of --provider and its flags, or None."""
    if FLAGS.provider is None:
        return None
    from attllm_jax.localization.ask import AskSettings

    source = flagdefs.llm_source_settings("", masks=FLAGS.masks)
    return AskSettings(source, city=FLAGS.city or "unknown", prompt=FLAGS.prompt, workers=FLAGS.workers)


def main(argv):
    if len(argv) > 1:
        fail("localize", f"unexpected arguments: {argv[1:]}", usage=True)
    from attllm_jax.localization import api
    from attllm_jax.outputs import OutputLockError, check_free

    settings = settings_from_flags()
    try:
        settings = settings.validated()
        api.list_photos(settings.images, settings.output_dir)
        from attllm_jax.data.dataset import load_image_set
        from attllm_jax.localization.geo import database_zone

        database = load_image_set(settings.database_folder, settings.convention, settings.database_csv)
        database_zone(database, settings.utm_zone)  # one line before any work when no zone is known
        api.load_checked_calibration(settings)  # a calibration of another --rerank stage: one line, before any work
        check_free(settings.output_dir, "localize")
    except (ValueError, FileNotFoundError, OutputLockError) as error:
        fail("localize", str(error))
    try:
        lock = api.claim_output_dir(settings.output_dir)  # the run's one claim of the folder, held to the end
    except OutputLockError as error:
        fail("localize", str(error))
    try:
        _run_locked(settings, lock)
    finally:
        lock.release()


def _run_locked(settings, lock) -> None:
    """The run, with the output folder held by ``lock``."""
    from dataclasses import replace

    from attllm_jax.data.coordinates import CoordinateError
    from attllm_jax.data.dataset import PathListError
    from attllm_jax.evaluation.pipeline import ModelLoadError
    from attllm_jax.evaluation.progress import setup_logging
    from attllm_jax.localization import api
    from attllm_jax.localization.calibrate_eval import calibrate_from_eval
    from attllm_jax.retrieval.store import StoreError

    out = lock.directory
    setup_logging(out / "localize.log")
    lock.log_takeover()
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
            _watch(settings, out, lock)
            return
        run = api.localize(settings, lock=lock)
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


def _watch(settings, out, lock) -> None:
    """Localizes settled new photos every --poll seconds with one loaded model, rewriting the outputs atomically."""
    import time

    from attllm_jax.localization import api

    model = api.load_localize_model(settings.eval_config(), settings.blend)
    settled, done = api.SettledFiles(FLAGS.settle), None
    print(f"watching {settings.images} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            ready = settled.poll(settings.images, settings.output_dir)
            if ready and ready != done:
                run = api.localize(settings, model=model, photos=ready, lock=lock)
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
