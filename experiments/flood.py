r"""Makes flooded copies of a folder of (geotagged) query photos, one folder per water level.

    python -m experiments.flood --images Q --output_dir O --method procedural --levels 0.2,0.4,0.6 --seed 0

writes, per level ``l``, ``O/level_<l>/<same relative path>`` (the coordinates in the file name carry over, so
``python -m experiments.eval --queries_folder O/level_<l> ...`` runs unchanged), ``O/masks/level_<l>/<stem>.png``
(8-bit, 255 = water; outside the image folders, so eval never lists them), ``O/flood_summary.json`` (method,
levels, seed, counts, failures) and ``O/flood.log``. ``--levels`` is the fraction of the frame's height the water
covers at its deepest.

Methods:
  procedural  the water of the built-in synthetic benchmark (attllm_jax.data.flood), deterministic in --seed and
              the image; --rain and --droplets add rain streaks and lens droplets over the whole frame.
  gemini      the paper's image-editing request to a Gemini image model (module
              attllm_jax.attention.providers.gemini_image_edit; prompt id gemini_flood_edit, versioned), with the
              requested depth in the text, through the annotation's request policy: --qpm rate limit, retries
              with Retry-After, key redaction; --base_url for a local server or proxy. The key comes from
              GEMINI_API_KEY or GOOGLE_API_KEY and is never printed or written. The water mask is an ESTIMATE
              (colour-matched difference to the dry photo, column-wise waterline); --noestimate_mask leaves
              masks out. Not deterministic: the model samples.

Resumable: (image, level) pairs whose image and mask exist are skipped, so a rerun continues where a killed run
stopped; unreadable images are skipped, listed and counted in the summary (exit status 3).
"""

import json
import logging

from absl import app, flags

from experiments import cli

FLAGS = flags.FLAGS
_METHODS = ("procedural", "gemini")

flags.DEFINE_string("images", None, "Folder of dry query photos (searched recursively).", required=True)
flags.DEFINE_string("output_dir", None, "Output folder (level_<l>/, masks/, flood_summary.json).", required=True)
flags.DEFINE_enum("method", "procedural", _METHODS, "How the water is made.")
flags.DEFINE_list("levels", ["0.2", "0.4", "0.6"], "Fractions of the frame height under water at the deepest, (0, 1].")
flags.DEFINE_integer("seed", 0, "Random seed (procedural: with the image, it fixes every draw).")
flags.DEFINE_float("rain", 0.0, "Procedural: rain-streak density in [0, 1] (0 = none).")
flags.DEFINE_integer("droplets", 0, "Procedural: water droplets on the lens (0 = none).", lower_bound=0)
flags.DEFINE_integer("jpeg_quality", 95, "Quality of flooded JPEGs.", lower_bound=1, upper_bound=100)
flags.DEFINE_integer("workers", 1, "Worker threads (gemini: requests in flight).", lower_bound=1)
flags.DEFINE_string("model", None, "Gemini: the image model (default gemini-2.5-flash-image).")
flags.DEFINE_string("base_url", None, "Gemini: endpoint instead of Google's (a local server, a proxy).")
flags.DEFINE_string("api_version", "v1beta", "Gemini: REST API version.")
flags.DEFINE_float(
    "qpm", 10.0, "Gemini: requests per minute, all workers and retries together (0: no limit).", lower_bound=0
)
flags.DEFINE_float(
    "timeout_s", 120.0, "Gemini: total deadline of each request in seconds (connect to last byte).", lower_bound=0.001
)
flags.DEFINE_integer("max_attempts", 5, "Gemini: attempts per image on 429/5xx/timeouts.", lower_bound=1)
flags.DEFINE_float("initial_backoff_s", 1.0, "Gemini: first retry delay (doubles, with jitter).", lower_bound=0)
flags.DEFINE_float("max_backoff_s", 60.0, "Gemini: longest backoff (a longer server delay is honoured).", lower_bound=0)
flags.DEFINE_bool("estimate_mask", True, "Gemini: estimate the water mask (else no masks are written).")


def _valid_levels(values) -> bool:
    from attllm_jax.data.flood import validate_levels

    try:
        validate_levels(values)
    except ValueError:
        return False
    return True


flags.register_validator("levels", _valid_levels, "--levels must be distinct fractions in (0, 1], e.g. 0.2,0.4,0.6")
flags.register_validator("rain", lambda v: 0.0 <= v <= 1.0, "--rain must be in [0, 1]")


def _setup_log(output_dir) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output_dir / "flood.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from pathlib import Path

    from attllm_jax.data import flood
    from attllm_jax.outputs import OutputLockError, check_free, refuse_output_inside

    out = Path(FLAGS.output_dir)
    try:  # before the log file is made: nothing is written into --images, nor into a folder another run holds
        refuse_output_inside(out, {"--images": FLAGS.images})
        check_free(out, "flood")
    except (ValueError, OutputLockError) as e:
        cli.fail("flood", str(e))
    _setup_log(out)
    log = logging.getLogger("flood")
    log.info("flags: %s", cli.flag_values(__name__))
    levels = [float(v) for v in FLAGS.levels]
    editor = None
    writes_masks = True
    try:
        if FLAGS.method == "gemini":
            from attllm_jax.attention.providers import gemini_image_edit as image_edit
            from attllm_jax.attention.request_policy import RateLimiter, RetryPolicy

            editor = image_edit.GeminiImageEditor(
                model=FLAGS.model or image_edit.DEFAULT_EDIT_MODEL,
                base_url=FLAGS.base_url,
                api_version=FLAGS.api_version,
                timeout_s=FLAGS.timeout_s,
                retry=RetryPolicy(FLAGS.max_attempts, FLAGS.initial_backoff_s, FLAGS.max_backoff_s),
                limiter=RateLimiter(FLAGS.qpm, 60.0),
            )
            method = image_edit.gemini_method(editor, estimate_mask=FLAGS.estimate_mask)
            writes_masks = FLAGS.estimate_mask
            settings = {
                "model": editor.model,
                "base_url": FLAGS.base_url,
                "prompt_id": editor.prompt.id,
                "prompt_version": editor.prompt.version,
                "mask": image_edit.MASK_NOTE if FLAGS.estimate_mask else "left out (--noestimate_mask)",
                "jpeg_quality": FLAGS.jpeg_quality,
            }
        else:
            style = flood.FloodStyle(rain=FLAGS.rain, droplets=FLAGS.droplets)
            method = flood.procedural_method(FLAGS.seed, style)
            settings = {**flood.style_dict(style), "jpeg_quality": FLAGS.jpeg_quality}
    except ValueError as e:
        cli.fail("flood", str(e))
    try:
        summary = flood.flood_folder(
            FLAGS.images,
            out,
            levels,
            method,
            method_name=FLAGS.method,
            seed=FLAGS.seed,
            settings=settings,
            workers=FLAGS.workers,
            jpeg_quality=FLAGS.jpeg_quality,
            writes_masks=writes_masks,
        )
    except (FileNotFoundError, ValueError, OutputLockError) as e:
        cli.fail("flood", str(e))
    finally:
        if editor is not None:
            editor.close()
    log.info("summary: %s", json.dumps(summary["counts"]))
    keys = ("method", "levels", "num_images", "counts", "num_failed", "aborted")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"summary: {out / flood.SUMMARY_FILE}")
    if summary["aborted"]:
        return 1
    return 3 if summary["num_failed"] else 0


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-flood``, also ``python -m experiments.flood``)."""
    cli.run_command("flood", main, cli.module_help(__doc__, __name__), argv)


if __name__ == "__main__":
    run()
