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

Resumable: (image, level) pairs whose image and mask exist are skipped, so a rerun continues where a killed run
stopped; unreadable images are skipped, listed and counted in the summary (exit status 3).
"""

import json
import logging
import sys

from absl import app, flags

FLAGS = flags.FLAGS
_METHODS = ("procedural",)

flags.DEFINE_string("images", None, "Folder of dry query photos (searched recursively).", required=True)
flags.DEFINE_string("output_dir", None, "Output folder (level_<l>/, masks/, flood_summary.json).", required=True)
flags.DEFINE_enum("method", "procedural", _METHODS, "How the water is made.")
flags.DEFINE_list("levels", ["0.2", "0.4", "0.6"], "Fractions of the frame height under water at the deepest, (0, 1].")
flags.DEFINE_integer("seed", 0, "Random seed (procedural: with the image, it fixes every draw).")
flags.DEFINE_float("rain", 0.0, "Procedural: rain-streak density in [0, 1] (0 = none).")
flags.DEFINE_integer("droplets", 0, "Procedural: water droplets on the lens (0 = none).", lower_bound=0)
flags.DEFINE_integer("jpeg_quality", 95, "Quality of flooded JPEGs.", lower_bound=1, upper_bound=100)
flags.DEFINE_integer("workers", 1, "Worker threads.", lower_bound=1)


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

    out = Path(FLAGS.output_dir)
    _setup_log(out)
    log = logging.getLogger("flood")
    log.info("flags: %s", json.dumps({f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.argv[0])}))
    levels = [float(v) for v in FLAGS.levels]
    style = flood.FloodStyle(rain=FLAGS.rain, droplets=FLAGS.droplets)
    method = flood.procedural_method(FLAGS.seed, style)
    settings = {**flood.style_dict(style), "jpeg_quality": FLAGS.jpeg_quality}
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
        )
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"flood: {e}")
    log.info("summary: %s", json.dumps(summary["counts"]))
    print(json.dumps({k: summary[k] for k in ("method", "levels", "num_images", "counts", "num_failed")}, indent=2))
    print(f"summary: {out / flood.SUMMARY_FILE}")
    return 3 if summary["num_failed"] else 0


if __name__ == "__main__":
    app.run(main)
