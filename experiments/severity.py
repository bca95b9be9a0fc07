r"""Severity sweep: recall per (water level, alpha) and the breaking points: ``python -m experiments.severity``.

    python -m experiments.severity --database_folder D --queries_folder DRY_Q --output_dir OUT \
        --levels 0,0.2,0.4,0.6,0.8 --alphas 0,0.1,...,1 --attention masks [--checkpoint DIR]

The dry queries are flooded procedurally at every level (OUT/flooded/, as experiments.flood writes it); each level is
evaluated over the whole alpha grid against one database store (OUT/database_store, extracted once); attention is
the oracle of the flood masks (--attention masks), the LLM's answers in --attention_dir/level_<l>/ (--attention dir)
or none. Writes OUT/severity.json (recall per level x alpha, the best alpha per level and its R@1 gain over alpha 0
with a paired bootstrap interval, the breaking points), OUT/severity_r1.png (heatmap of R@1 over level x alpha),
OUT/levels/level_<l>/ (each level's eval outputs) and OUT/severity.log. Every step resumes.

With no dataset flags it runs on the built-in synthetic streets (dry query views, a random-weight CosPlace
ResNet-18/512, oracle mask attention) in a few minutes on a CPU, into outputs/severity.
"""

import math
import sys

from absl import app, flags

FLAGS = flags.FLAGS

flags.DEFINE_string("database_folder", None, "Database images (geotagged names or --database_csv).")
flags.DEFINE_string("queries_folder", None, "DRY query images; they are flooded at every level.")
flags.DEFINE_string("output_dir", None, "Output folder (default outputs/severity for the synthetic run).")
flags.DEFINE_string("checkpoint", None, "A converted model directory (default: random-weight CosPlace ResNet-18/512).")
flags.DEFINE_list("levels", ["0", "0.2", "0.4", "0.6", "0.8"], "Water levels in [0, 1]; 0 (dry) is always included.")
flags.DEFINE_list("alphas", None, "Blend factors in [0, 1] (default 0,0.1,...,1); 0 is always included.")
flags.DEFINE_enum("attention", "masks", ["masks", "dir", "none"], "Attention of the flooded queries.")
flags.DEFINE_string("attention_dir", None, "With --attention dir: a folder of level_<l>/ attention folders.")
flags.DEFINE_integer("seed", 0, "Seed of the procedural flood.")
flags.DEFINE_float("rain", 0.0, "Rain-streak density in [0, 1].")
flags.DEFINE_integer("droplets", 0, "Lens droplets.", lower_bound=0)
flags.DEFINE_float("positive_dist_threshold", 25.0, "Positive radius in metres.")
flags.DEFINE_list("recall_values", ["1", "5", "10", "20"], "The N of recall@N (1 is always included).")
flags.DEFINE_list("image_size", None, "Resize override: shorter side (one int) or height,width.")
flags.DEFINE_integer("batch_size", 8, "Images per device batch.", lower_bound=1)
flags.DEFINE_string("store_dir", None, "Database descriptor store (default OUTPUT_DIR/database_store).")
flags.DEFINE_string("database_csv", None, "Optional coordinates CSV of the database.")
flags.DEFINE_integer("bootstrap", 2000, "Paired bootstrap resamples.", lower_bound=1)
flags.DEFINE_integer("model_seed", 0, "Seed of the random-weight model (without --checkpoint).")
flags.DEFINE_string("cache_dir", "cache", "Where the synthetic streets are generated and cached.")


def _floats_ok(values, low=0.0, high=1.0) -> bool:
    if values is None:
        return True
    try:
        floats = [float(v) for v in values]
    except ValueError:
        return False
    return bool(floats) and all(math.isfinite(v) and low <= v <= high for v in floats)


flags.register_validator("levels", _floats_ok, "--levels must be numbers in [0, 1]")
flags.register_validator("alphas", _floats_ok, "--alphas must be numbers in [0, 1]")
flags.register_validator("rain", lambda v: 0.0 <= v <= 1.0, "--rain must be in [0, 1]")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from dataclasses import replace

    from attllm_jax.data.coordinates import CoordinateError
    from attllm_jax.data.flood import FloodStyle
    from attllm_jax.evaluation.config import EvalConfig
    from attllm_jax.evaluation.severity import (
        HEATMAP_FILE,
        SEVERITY_FILE,
        SeverityConfig,
        run_severity,
        severity_table,
        synthetic_severity_config,
    )
    from attllm_jax.outputs import OutputLockError
    from attllm_jax.retrieval.store import StoreError

    overrides = {
        "checkpoint": FLAGS.checkpoint,
        "recall_values": tuple(int(v) for v in FLAGS.recall_values),
        "positive_dist_threshold": FLAGS.positive_dist_threshold,
        "batch_size": FLAGS.batch_size,
        "store_dir": FLAGS.store_dir,
        "model_seed": FLAGS.model_seed,
    }
    if FLAGS.alphas is not None:
        overrides["alphas"] = tuple(float(a) for a in FLAGS.alphas)
    if FLAGS.image_size:
        sizes = [int(v) for v in FLAGS.image_size]
        overrides["image_size"] = sizes[0] if len(sizes) == 1 else tuple(sizes)
    sweep = {
        "levels": tuple(float(v) for v in FLAGS.levels),
        "attention": FLAGS.attention,
        "attention_dir": FLAGS.attention_dir,
        "seed": FLAGS.seed,
        "style": FloodStyle(rain=FLAGS.rain, droplets=FLAGS.droplets),
        "bootstrap": FLAGS.bootstrap,
    }
    if FLAGS.attention == "dir" and not FLAGS.attention_dir:
        raise app.UsageError("--attention dir needs --attention_dir (a folder of level_<l>/ attention folders)")
    synthetic = FLAGS.database_folder is None and FLAGS.queries_folder is None
    try:
        if synthetic:
            if FLAGS.database_csv:
                raise app.UsageError("--database_csv needs --database_folder and --queries_folder")
            config = synthetic_severity_config(
                FLAGS.cache_dir,
                FLAGS.output_dir or "outputs/severity",
                checkpoint=FLAGS.checkpoint,
                attention=FLAGS.attention,
            )
            config = replace(config, eval=replace(config.eval, **overrides), **sweep)
        else:
            if FLAGS.database_folder is None or FLAGS.queries_folder is None or FLAGS.output_dir is None:
                raise app.UsageError("give --database_folder, --queries_folder and --output_dir (or none of them)")
            ev = EvalConfig(
                database_folder=FLAGS.database_folder,
                queries_folder=FLAGS.queries_folder,
                output_dir=FLAGS.output_dir,
                database_csv=FLAGS.database_csv,
                **overrides,
            )
            config = SeverityConfig(eval=ev, **sweep)
        config = config.validated()
        config.eval.check_output_outside_inputs()
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from None
    try:
        severity = run_severity(config)
    except (CoordinateError, StoreError, FileNotFoundError, OutputLockError) as error:
        print(f"severity: error: {error}", file=sys.stderr)
        sys.exit(1)
    print()
    for note in config.eval.notes:
        print(note)
    print(f"{severity['num_database']} database images, queries per level {severity['num_queries']}")
    print(severity_table(severity))
    out = config.eval.output_dir
    print(f"results: {out}/{SEVERITY_FILE}, heatmap: {out}/{HEATMAP_FILE}")
    sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
