r"""Severity sweep: recall per (water level, alpha) and the breaking points: ``python -m experiments.severity``.

    python -m experiments.severity --database_folder D --queries_folder DRY_Q --output_dir OUT \
        --levels 0,0.2,0.4,0.6,0.8 --alphas 0:1:11 --attention masks [--checkpoint DIR]

The dry queries are flooded procedurally at every level (OUT/flooded/, as experiments.flood writes it); each level is
evaluated over the whole alpha grid against one database store (OUT/database_store, extracted once); attention is
the oracle of the flood masks (--attention masks), the LLM's answers in --attention_dir/level_<l>/ (--attention dir)
or none. Writes OUT/severity.json (recall per level x alpha, the best alpha per level and its R@1 gain over alpha 0
with a paired bootstrap interval, the breaking points), OUT/severity_r1.png (heatmap of R@1 over level x alpha),
OUT/levels/level_<l>/ (each level's eval outputs) and OUT/severity.log. Every step resumes.

With no dataset flags it runs on the built-in synthetic streets (dry query views, a random-weight CosPlace
ResNet-18/512, oracle mask attention) in a few minutes on a CPU, into outputs/severity.

--alphas takes eval's forms, a list (0,0.25,0.5,1) or start:stop:count; the default 0:1:11 is 0, 0.1, ..., 1.
0 is always included. --levels is a list.
"""

import math
import sys
from dataclasses import replace

from absl import app, flags

from experiments import cli, flagdefs

FLAGS = flags.FLAGS

flagdefs.define(
    "checkpoint",
    "database_folder",
    "queries_folder",
    "database_csv",
    "image_size",
    "precision",
    "batch_size",
    "store_dir",
    "model_seed",
    "cache_dir",
    "alphas",
    "recall_values",
    "positive_dist_threshold",
)
flags.DEFINE_string("output_dir", None, "Output folder (default outputs/severity for the synthetic run).")
flags.DEFINE_list("levels", ["0", "0.2", "0.4", "0.6", "0.8"], "Water levels in [0, 1]; 0 (dry) is always included.")
flags.DEFINE_enum("attention", "masks", ["masks", "dir", "none"], "Attention of the flooded queries.")
flags.DEFINE_string("attention_dir", None, "With --attention dir: a folder of level_<l>/ attention folders.")
flags.DEFINE_integer("seed", 0, "Seed of the procedural flood.")
flags.DEFINE_float("rain", 0.0, "Rain-streak density in [0, 1].")
flags.DEFINE_integer("droplets", 0, "Lens droplets.", lower_bound=0)
flags.DEFINE_integer("bootstrap", 2000, "Paired bootstrap resamples.", lower_bound=1)

DEFAULT_ALPHAS = "0:1:11"


def _levels_ok(values) -> bool:
    try:
        levels = [float(v) for v in values]
    except ValueError:
        return False
    return bool(levels) and all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in levels)


flags.register_validator("levels", _levels_ok, "--levels must be numbers in [0, 1]")
flags.register_validator("rain", lambda v: 0.0 <= v <= 1.0, "--rain must be in [0, 1]")
flags.register_multi_flags_validator(
    ["attention", "attention_dir"],
    lambda v: v["attention"] != "dir" or bool(v["attention_dir"]),
    "--attention dir needs --attention_dir (a folder of level_<l>/ attention folders)",
)


def _config():
    """The validated SeverityConfig of the flags (the synthetic streets without dataset flags)."""
    from attllm_jax.data.flood import FloodStyle
    from attllm_jax.evaluation.config import EvalConfig
    from attllm_jax.evaluation.severity import SeverityConfig, synthetic_severity_config

    overrides = {
        "checkpoint": FLAGS.checkpoint,
        "recall_values": flagdefs.recall_values(),
        "positive_dist_threshold": FLAGS.positive_dist_threshold,
        "batch_size": FLAGS.batch_size,
        "store_dir": FLAGS.store_dir,
        "model_seed": FLAGS.model_seed,
        "precision": FLAGS.precision,
        "alphas": tuple(flagdefs.parse_values(FLAGS.alphas or [DEFAULT_ALPHAS])),
    }
    if flagdefs.image_size() is not None:
        overrides["image_size"] = flagdefs.image_size()
    sweep = {
        "levels": tuple(float(v) for v in FLAGS.levels),
        "attention": FLAGS.attention,
        "attention_dir": FLAGS.attention_dir,
        "seed": FLAGS.seed,
        "style": FloodStyle(rain=FLAGS.rain, droplets=FLAGS.droplets),
        "bootstrap": FLAGS.bootstrap,
    }
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
        return config
    except (ValueError, FileNotFoundError) as error:
        raise app.UsageError(str(error)) from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from attllm_jax.data.coordinates import CoordinateError
    from attllm_jax.evaluation.severity import HEATMAP_FILE, SEVERITY_FILE, run_severity, severity_table
    from attllm_jax.outputs import OutputLockError
    from attllm_jax.retrieval.store import StoreError

    config = _config()
    cli.print_runtime("severity", config.eval.precision)
    try:
        severity = run_severity(config)
    except (CoordinateError, StoreError, FileNotFoundError, OutputLockError) as error:
        cli.fail("severity", str(error))
    print()
    for note in config.eval.notes:
        print(note)
    print(f"{severity['num_database']} database images, queries per level {severity['num_queries']}")
    print(severity_table(severity))
    out = config.eval.output_dir
    print(f"results: {out}/{SEVERITY_FILE}, heatmap: {out}/{HEATMAP_FILE}")
    sys.stdout.flush()


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-severity``, also ``python -m experiments.severity``)."""
    cli.run_command("severity", main, cli.module_help(__doc__, __name__), argv)


if __name__ == "__main__":
    run()
