r"""Tune alpha, sigma and the blend honestly: ``python -m experiments.tune``.

Takes the dataset / model / attention flags of ``experiments.eval`` (defined there, imported here) and searches
(alpha, sigma, blend) from caches: the database store, an on-disk query-feature cache and the parsed attention
answers, so each evaluated point costs one aggregation and one search. With no dataset flags it tunes on the
demo's synthetic flooded streets (random-weight CosPlace ResNet-18/512, oracle attention). A real run:

    python -m experiments.tune --checkpoint DIR --database_folder D --queries_folder Q --attention_dir A \
        --alphas 0:1:101 --sigmas 0.1,0.2,0.3 --blends native,uniform --objective r@1 \
        --folds 5 --group_radius 50 --method both --output_dir OUT

writes OUT/tuning.json (best, grid, folds, cv, optax), OUT/recall_vs_alpha_folds.png and OUT/tune.log
(see attllm_jax.tuning.run.run_tuning). With eval's --rerank (same syntax), --symmetric_k (with --db_masks or
--db_provider) and --chain_stages, each stage is run on the same folds at each fold's chosen alpha (tuning.json
rerank: held-out interval, paired comparison with plain).
--alphas and --sigmas take lists and start:stop:count ranges; --alphas
defaults to 0:1:101 (0, 0.01, ..., 1), --sigmas to --sigma.
"""

from __future__ import annotations

import json
import math
import sys

from absl import app, flags

from experiments import cli, flagdefs
from experiments import eval as eval_cli

FLAGS = flags.FLAGS

flags.DEFINE_enum("objective", "r@1", ["r@1", "r@5", "mean"], "What to maximize (mean: of recall@N over every N).")
flags.DEFINE_list("sigmas", None, "RBF widths to search (list or start:stop:count); default: --sigma.")
flags.DEFINE_list("blends", ["native"], "Blends to search: native and/or uniform.")
flags.DEFINE_integer("folds", 5, "Spatially blocked cross-validation folds (>= 2).")
flags.DEFINE_float("group_radius", None, "Queries within this many metres share a fold (default 2 x positive radius).")
flags.DEFINE_enum("method", "grid", ["grid", "optax", "both"], "Gradient-free grid search, optax, or both.")
flags.DEFINE_string("feature_cache_dir", None, "Query backbone-feature cache (default OUTPUT_DIR/query_features).")
flags.DEFINE_integer("seed", 0, "Seed of the fold assignment and the bootstrap.")
flags.DEFINE_integer("bootstrap_samples", 2000, "Bootstrap resamples of the intervals.")
flags.DEFINE_integer("refine_iterations", 8, "Golden-section evaluations per refined coordinate (0: grid only).")
flags.DEFINE_integer("optax_steps", 100, "Adam steps per fold and blend.")
flags.DEFINE_float("optax_learning_rate", 0.05, "Adam step size on the unconstrained (alpha, sigma).")
flags.DEFINE_float("temperature", 0.1, "Soft-rank temperature of the optax surrogate (in score standard deviations).")

flagdefs.define("alpha_policy")
DEFAULT_ALPHAS = "0:1:101"


def _valid_sigmas(values) -> bool:
    if values is None:
        return True
    try:
        sigmas = flagdefs.parse_values(values)
    except ValueError:
        return False
    return bool(sigmas) and all(math.isfinite(s) and s > 0 for s in sigmas) and len(set(sigmas)) == len(sigmas)


flags.register_validator("sigmas", _valid_sigmas, "--sigmas must be distinct positive numbers (or start:stop:count)")
flags.register_validator("blends", lambda v: bool(v) and set(v) <= {"native", "uniform"}, "--blends: native,uniform")
flags.register_validator("folds", lambda v: v >= 2, "--folds must be >= 2")
flags.register_validator("group_radius", lambda v: v is None or v > 0, "--group_radius must be > 0 metres")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from attllm_jax.data.coordinates import CoordinateError
    from attllm_jax.outputs import OutputLockError, check_free
    from attllm_jax.retrieval.search import SearchMemoryError
    from attllm_jax.retrieval.store import StoreError
    from attllm_jax.tuning import TuneSettings, run_tuning
    from attllm_jax.tuning.cache import CacheError

    if FLAGS.coordinator_address or FLAGS.num_processes or FLAGS.process_id is not None or FLAGS.distributed == "auto":
        # eval's flags include the multi-host ones; tuning runs in one process (its cost is the cached sweeps)
        raise app.UsageError(
            "tune runs in one process: extract the database store with several hosts first "
            "(experiments.extract), then tune with --store_dir on one"
        )
    alphas = tuple(flagdefs.parse_values(FLAGS.alphas or [DEFAULT_ALPHAS]))
    sigmas = tuple(flagdefs.parse_values(FLAGS.sigmas)) if FLAGS.sigmas else (FLAGS.sigma,)
    settings = TuneSettings(
        alphas=alphas,
        sigmas=sigmas,
        blends=tuple(FLAGS.blends),
        objective=FLAGS.objective,
        folds=FLAGS.folds,
        group_radius=FLAGS.group_radius,
        method=FLAGS.method,
        feature_cache_dir=FLAGS.feature_cache_dir,
        seed=FLAGS.seed,
        bootstrap_samples=FLAGS.bootstrap_samples,
        refine_iterations=FLAGS.refine_iterations,
        optax_steps=FLAGS.optax_steps,
        optax_learning_rate=FLAGS.optax_learning_rate,
        temperature=FLAGS.temperature,
        alpha_policy=FLAGS.alpha_policy,
    )
    try:  # before any work: the settings alone decide, e.g. --sigmas too small for --method both
        settings = settings.validated(flagdefs.recall_values())
    except ValueError as error:
        raise app.UsageError(str(error)) from None
    config = eval_cli.config_from_flags("outputs/tune_demo", command="tune", alphas=alphas)
    try:
        check_free(config.output_dir, "tune")
    except OutputLockError as error:
        cli.fail("tune", str(error))
    cli.print_runtime("tune", config.precision)
    try:
        result = run_tuning(config, settings)
    except (
        CoordinateError,
        StoreError,
        SearchMemoryError,
        CacheError,
        FileNotFoundError,
        ValueError,
        OutputLockError,
    ) as error:
        cli.fail("tune", str(error))
    print()
    for note in config.notes:
        print(note)
    best = result["best"]
    print(
        f"best on all {result['num_queries']} queries: alpha {best['alpha']:.4g}, sigma {best['sigma']:.3g}, "
        f"blend {best['blend']}, {FLAGS.objective} {best['objective']:.2f} (grid plateau alpha "
        f"{best['plateau'][0]:.3g}..{best['plateau'][1]:.3g}, {best['source']})"
    )
    cv = result["cv"]
    for n, row in cv["heldout"].items():
        gain = cv["gain_vs_alpha0"][n]
        print(
            f"held-out R@{n} over {FLAGS.folds} spatial folds: {row['mean']:.1f} (95% CI {row['ci95'][0]:.1f}.."
            f"{row['ci95'][1]:.1f}); gain vs alpha 0: {gain['mean']:+.1f} "
            f"({gain['ci95'][0]:+.1f}..{gain['ci95'][1]:+.1f})"
        )
    print(f"McNemar (R@{cv['mcnemar_n']}, tuned vs alpha 0): p = {cv['mcnemar_p']:.3g}")
    print_comparisons(result)
    if "heldout" in result["optax"]:
        print(f"optax held-out: {json.dumps({n: r['mean'] for n, r in result['optax']['heldout'].items()})}")
    print(f"tuning: {config.output_dir}/tuning.json")
    sys.stdout.flush()


def print_comparisons(result: dict) -> None:
    """One line per compared stage of tuning.json: the alpha policy, each --rerank stage, the symmetric stage and
    each chain, with its held-out recall and paired gain."""
    policy = result["alpha_policy"]
    if "heldout" in policy:
        _print_paired(f"alpha policy {policy['policy']}", policy["heldout"], policy["vs_global"], "best global alpha")
    for kind, stage in result["rerank"].items():
        if kind == "chained":
            for chain in stage.values():
                _print_paired(f"chain {' -> '.join(chain['stages'])}", chain["heldout"], chain["vs_plain"], "plain")
        elif isinstance(stage, dict) and "heldout" in stage:
            label = stage.get("spec") or f"symmetric:k={stage['params']['k']},alpha_db={stage['params']['alpha_db']:g}"
            _print_paired(f"re-ranking {label}", stage["heldout"], stage["vs_plain"], "plain")


def _print_paired(label: str, heldout: dict, paired: dict, against: str) -> None:
    """One line: a stage's held-out recall at the McNemar N and its paired gain over ``against`` (tuning.json)."""
    n = paired["mcnemar_n"]
    gain = paired["gain"][str(n)]
    print(
        f"{label} held-out R@{n}: {heldout[str(n)]['mean']:.1f}; vs {against}: {gain['mean']:+.1f} "
        f"({gain['ci95'][0]:+.1f}..{gain['ci95'][1]:+.1f}), McNemar p = {paired['mcnemar_p']:.3g}"
    )


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-tune``, also ``python -m experiments.tune``); ``--help`` exits 0."""
    cli.run_command("tune", main, cli.module_help(__doc__, __name__, eval_cli.__name__), argv)


if __name__ == "__main__":
    run()
