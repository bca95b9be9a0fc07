"""The severity sweep: how deep can the water get before attention stops helping?

The dry queries are flooded procedurally at each level (:mod:`attllm_jax.data.flood`); every level is one
evaluation (:func:`~attllm_jax.evaluation.pipeline.run_evaluation`) over the whole alpha grid, in one vmapped pass
per query batch, against ONE database descriptor store that is extracted once and reused by every level. Level 0
is the dry queries themselves. The attention of a flooded level is the oracle grid of its water mask (what a perfect
flood detector would give, as ``experiments.annotate --provider masks`` writes it) or, with an attention folder,
the LLM's answers in ``<attention_dir>/level_<l>/``.

From the table of recall per (level, alpha) it reports, per level, the best alpha by R@1 (ties: the smaller alpha)
and its R@1 gain over alpha 0 with a paired bootstrap interval over the queries, and two breaking points: the
shallowest level from which on R@1 stays below half of the dry R@1, and the shallowest flooded level from which on
the best alpha's gain is no longer above zero. The best alpha is chosen on the same queries it is scored on, so its
gain is an optimistic estimate; the interval only covers query sampling.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from attllm_jax.data.dataset import list_images
from attllm_jax.data.flood import FloodStyle, flood_folder, level_name, procedural_method, style_dict, validate_levels
from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
from attllm_jax.evaluation.config import EvalConfig, alpha_key
from attllm_jax.evaluation.demo import DEMO_IMAGE_SIZE, DEMO_NOTES
from attllm_jax.evaluation.pipeline import EvalResult, load_eval_model, run_evaluation
from attllm_jax.evaluation.progress import setup_logging
from attllm_jax.files import atomic_write_json
from attllm_jax.models.spec import ModelSpec
from attllm_jax.models.vpr import DescriptorModel
from attllm_jax.outputs import OUTPUTS_KEY, OutputLock, relative_outputs, remove_previous_outputs
from attllm_jax.retrieval.recall import recall_from_ranks

log = logging.getLogger("attllm_jax.evaluation")

SEVERITY_FILE = "severity.json"
MAX_LISTED_DROPPED = 20
HEATMAP_FILE = "severity_r1.png"
ATTENTION_KINDS = ("masks", "dir", "none")


@dataclass(frozen=True)
class SeverityConfig:
    """A severity sweep.

    Attributes:
        eval: The evaluation settings shared by every level (database, dry queries in ``queries_folder``, model,
            alphas, recall values, threshold, image size ...); ``output_dir`` is the sweep's folder and
            ``attention_dir`` is ignored (see ``attention``).
        levels: Water levels (fractions of the frame height at the deepest), 0 = the dry queries; 0 is added.
        attention: "masks" (oracle attention from the flood masks), "dir" (``attention_dir/level_<l>/``) or "none".
        attention_dir: With ``attention="dir"``: a folder holding ``level_<l>/`` attention folders.
        seed: Seed of the procedural flood.
        style: Rain and lens droplets of the flood.
        bootstrap: Paired bootstrap resamples of the queries for the gain intervals.
        confidence: Coverage of the bootstrap intervals.
    """

    eval: EvalConfig
    levels: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8)
    attention: str = "masks"
    attention_dir: str | None = None
    seed: int = 0
    style: FloodStyle = field(default_factory=FloodStyle)
    bootstrap: int = 2000
    confidence: float = 0.95

    def validated(self) -> SeverityConfig:
        """Checks the settings before any work; returns a normalized copy (levels and alphas sorted, 0 added to both).

        Raises:
            ValueError / FileNotFoundError: naming the bad setting.
        """
        levels = tuple(sorted(set(validate_levels(self.levels, allow_zero=True)) | {0.0}))
        if len(levels) < 2:
            raise ValueError(
                f"--levels needs at least one level above 0 (0 = dry is always included), got {self.levels}"
            )
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"--attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")
        if self.attention == "dir":
            if not self.attention_dir or not Path(self.attention_dir).is_dir():
                raise FileNotFoundError(
                    f"--attention dir needs --attention_dir with level_<l>/ folders, got {self.attention_dir!r}"
                )
            missing = [
                level_name(v) for v in levels if v > 0 and not (Path(self.attention_dir) / level_name(v)).is_dir()
            ]
            if missing:
                raise FileNotFoundError(f"--attention_dir {self.attention_dir} has no folder {', '.join(missing)}")
        if self.bootstrap < 1:
            raise ValueError(f"--bootstrap must be >= 1, got {self.bootstrap}")
        if not (0.0 < self.confidence < 1.0):
            raise ValueError(f"--confidence must be in (0, 1), got {self.confidence}")
        ev = replace(self.eval, attention_dir=None).validated()
        ev = replace(ev, alphas=tuple(sorted(set(ev.alphas) | {0.0})))  # heatmap columns in order, alpha 0 the base
        if 1 not in ev.recall_values:
            ev = replace(ev, recall_values=(1, *ev.recall_values))
        return replace(self, eval=ev, levels=levels)


# ----------------------------------------------------------------------------------------------------------------
# The analysis of the table (pure functions)


def paired_bootstrap(
    hits_a: np.ndarray, hits_b: np.ndarray, resamples: int, confidence: float, seed: int = 0
) -> tuple[float, float, float]:
    """The difference of two hit rates on the same queries, in percentage points, with a percentile interval.

    Args:
        hits_a: ``[Q]`` bool (or 0/1), e.g. R@1 hits at the best alpha.
        hits_b: ``[Q]`` the same queries' hits at the reference (alpha 0).
        resamples: Bootstrap resamples of the queries (with replacement, the same draw for both).
        confidence: Interval coverage, e.g. 0.95.
        seed: Resampling seed.

    Returns:
        ``(gain, low, high)``: ``100 * mean(a - b)`` and the interval's ends.
    """
    diff = np.asarray(hits_a, np.float64) - np.asarray(hits_b, np.float64)
    if diff.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, diff.size, size=(int(resamples), diff.size))
    means = diff[draws].mean(axis=1) * 100.0
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(diff.mean() * 100.0), float(low), float(high)


@dataclass(frozen=True)
class LevelQueries:
    """One level's queries as its evaluation saw them.

    Attributes:
        paths: ``[Q_l]`` query paths relative to the level's folder (the same relative path at every level).
        readable: ``[Q_l]`` bool, False for queries skipped as unreadable.
        first_hit: ``[K, Q_l]`` rank of each query's first positive per alpha, -1 = miss.
    """

    paths: tuple[str, ...]
    readable: np.ndarray
    first_hit: np.ndarray


@dataclass(frozen=True)
class CommonQueries:
    """The queries compared across levels: those readable at every level.

    Attributes:
        paths: The common query paths, in the dry level's order.
        first_hit: L arrays ``[K, C]``, each level's first-hit ranks on the common queries.
        dropped: Per level, its queries left out (unreadable there, or missing or unreadable at another level).
    """

    paths: tuple[str, ...]
    first_hit: list[np.ndarray]
    dropped: list[list[str]]


def common_queries(levels: Sequence[LevelQueries]) -> CommonQueries:
    """Restricts every level to the queries readable at every level, so that their recalls are comparable.

    A dry query that cannot be read is not flooded, so without this the dry level would score over more queries
    than the flooded ones (e.g. R@1 over 8 dry queries, over 7 flooded).
    """
    readable = [{p for p, ok in zip(lv.paths, lv.readable, strict=True) if ok} for lv in levels]
    common = set.intersection(*readable) if readable else set()
    paths = tuple(p for p in levels[0].paths if p in common)
    first_hit, dropped = [], []
    for lv in levels:
        position = {p: i for i, p in enumerate(lv.paths)}
        first_hit.append(np.asarray(lv.first_hit)[:, [position[p] for p in paths]])
        dropped.append([p for p in lv.paths if p not in common])
    return CommonQueries(paths, first_hit, dropped)


def first_level_from_which(levels: Sequence[float], condition: Sequence[bool]) -> float | None:
    """The smallest level such that ``condition`` holds at it and at every deeper level, or None."""
    found = None
    for level, holds in sorted(zip(levels, condition, strict=True), reverse=True):
        if not holds:
            break
        found = level
    return found


def analyse(
    levels: Sequence[float],
    alphas: Sequence[float],
    recall_values: Sequence[int],
    recalls: np.ndarray,
    hits_at_1: Sequence[np.ndarray],
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Best alpha, gain and breaking points from the recall table.

    Args:
        levels: ``[L]`` sorted, ``levels[0] == 0`` (dry).
        alphas: ``[K]`` with 0 among them.
        recall_values: The N; 1 among them.
        recalls: ``[L, K, len(recall_values)]`` percentages.
        hits_at_1: L arrays ``[K, Q_l]`` bool: whether each query's top-1 is a positive, per alpha.
        resamples: Bootstrap resamples.
        confidence: Interval coverage.
        seed: Bootstrap seed.

    Returns:
        ``{"per_level": [...], "dry_r1", "half_dry_r1", "breaking_points": {...}}`` (see the module docstring).
    """
    levels, alphas = [float(v) for v in levels], [float(a) for a in alphas]
    if levels[0] != 0.0 or levels != sorted(levels):
        raise ValueError(f"levels must be sorted and start at 0 (dry), got {levels}")
    r1 = recalls[:, :, list(recall_values).index(1)]
    k0 = alphas.index(0.0)
    dry_r1 = float(r1[0, k0])
    per_level = []
    for li, level in enumerate(levels):
        row = r1[li]
        best = min(range(len(alphas)), key=lambda k: (-row[k], alphas[k]))  # highest R@1, then smallest alpha
        gain = paired_bootstrap(hits_at_1[li][best], hits_at_1[li][k0], resamples, confidence, seed + li)
        per_level.append(_level_entry(level, float(row[k0]), alphas[best], float(row[best]), gain, dry_r1))
    return {
        "dry_r1": dry_r1,
        "half_dry_r1": dry_r1 / 2,
        "per_level": per_level,
        "breaking_points": breaking_points(per_level),
    }


def _level_entry(
    level: float, r1_alpha0: float, best_alpha: float, best_r1: float, gain: tuple[float, float, float], dry_r1: float
) -> dict[str, Any]:
    """One level's ``per_level`` entry: R@1 at alpha 0 and at the best alpha, the gain and its interval."""
    value, low, high = gain
    return {
        "level": level,
        "r1_alpha0": r1_alpha0,
        "best_alpha": best_alpha,
        "best_r1": best_r1,
        "gain_r1": round(value, 6),
        "gain_r1_interval": [round(low, 6), round(high, 6)],
        "below_half_dry_alpha0": bool(r1_alpha0 < dry_r1 / 2),
        "below_half_dry_best": bool(best_r1 < dry_r1 / 2),
    }


def breaking_points(per_level: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The shallowest levels from which on R@1 stays below half the dry R@1 and the best alpha's gain stays <= 0."""
    levels = [p["level"] for p in per_level]
    flooded = [p for p in per_level if p["level"] > 0]
    return {
        "r1_below_half_dry_alpha0": first_level_from_which(levels, [p["below_half_dry_alpha0"] for p in per_level]),
        "r1_below_half_dry_best_alpha": first_level_from_which(levels, [p["below_half_dry_best"] for p in per_level]),
        "gain_not_above_zero": first_level_from_which(
            [p["level"] for p in flooded], [p["gain_r1"] <= 0 for p in flooded]
        ),
        "gain_interval_not_above_zero": first_level_from_which(
            [p["level"] for p in flooded], [p["gain_r1_interval"][0] <= 0 for p in flooded]
        ),
        "definition": (
            "the shallowest level from which on (at it and at every deeper level) the condition holds; null "
            "if it does not hold at the deepest level. R@1 below half of the dry R@1 (level 0, alpha 0), at "
            "alpha 0 and at the level's best alpha; the best alpha's R@1 gain over alpha 0 not above zero "
            "(point estimate; and the lower end of its bootstrap interval)"
        ),
    }


def cell_label(value: float) -> str:
    """A heatmap cell's R@1 as the severity table writes it (one decimal: 57.5 stays 57.5, not 58)."""
    return f"{value:.1f}"


def plot_heatmap(path: str | Path, levels, alphas, r1: np.ndarray, best_alphas, title: str) -> None:
    """A PNG of R@1 (%) over (level rows, alpha columns), values written in the cells, best alphas framed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(1.0 + 0.62 * len(alphas), 1.2 + 0.45 * len(levels)), dpi=120)
    image = ax.imshow(r1, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for i in range(len(levels)):
        for j in range(len(alphas)):
            value = r1[i, j]
            ax.text(j, i, cell_label(value), ha="center", va="center", fontsize=6, color="w" if value < 60 else "k")
        j = list(alphas).index(best_alphas[i])
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas], fontsize=7)
    ax.set_yticks(range(len(levels)), [f"{v:g}" for v in levels], fontsize=7)
    ax.set_xlabel("alpha (attention blend)")
    ax.set_ylabel("water level (fraction of frame height)")
    ax.set_title(title, fontsize=8)
    fig.colorbar(image, ax=ax, label="R@1 (%)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# The sweep


def _level_attention(config: SeverityConfig, out: Path, level: float, queries_dir: Path) -> str | None:
    """The attention folder of one level (writing the mask oracle's files first), or None for no attention."""
    if level == 0.0 or config.attention == "none":
        if config.attention == "dir" and (Path(config.attention_dir) / level_name(0.0)).is_dir():
            return str(Path(config.attention_dir) / level_name(0.0))
        return None
    if config.attention == "dir":
        folder = Path(config.attention_dir) / level_name(level)
        if not folder.is_dir():
            raise FileNotFoundError(f"no attention folder {folder} for level {level:g}")
        return str(folder)
    from attllm_jax.attention.masks import MASKS_PROMPT, MasksProvider
    from attllm_jax.attention.runner import RunConfig, annotate_folder

    target = out / "attention_masks" / level_name(level)
    masks = out / "flooded" / "masks" / level_name(level)
    summary = annotate_folder(queries_dir, target, MasksProvider(masks), RunConfig("n/a", MASKS_PROMPT, workers=1))
    if summary.failed:
        log.warning(
            "level %g: %d queries have no usable water mask (they run without attention)", level, summary.failed
        )
    return str(target)


def run_severity(config: SeverityConfig, model: DescriptorModel | None = None) -> dict[str, Any]:
    """Runs the sweep and writes ``severity.json``, ``severity_r1.png`` and one eval folder per level.

    Layout of ``config.eval.output_dir``: ``flooded/`` (the flooded queries and masks, as ``experiments.flood``
    writes them), ``attention_masks/level_<l>/`` (mask attention), ``levels/level_<l>/`` (each level's eval
    outputs: results.json, per_query.csv, ...), ``database_store/`` (shared by every level), ``severity.json``,
    ``severity_r1.png``, ``severity.log``. Every step resumes: flooded images, attention files and store chunks
    already written are reused.

    Args:
        config: The sweep.
        model: Optional loaded model (else from the eval settings).

    Returns:
        The content of severity.json.
    """
    t_start = time.perf_counter()
    config = config.validated()
    ev = config.eval
    ev.check_output_outside_inputs()
    out = Path(ev.output_dir)
    with OutputLock(out, "severity") as lock:
        setup_logging(out / "severity.log")
        lock.log_takeover()
        remove_previous_outputs(out, SEVERITY_FILE, also=[HEATMAP_FILE])
        return _sweep(config, out, model, t_start)


@dataclass(frozen=True)
class FloodedQueries:
    """The sweep's first stage: the dry queries flooded at every level.

    Attributes:
        summary: :func:`~attllm_jax.data.flood.flood_folder`'s summary (``flood_summary.json``).
        seconds: Wall time.
    """

    summary: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class LevelRun:
    """One level's evaluation.

    Attributes:
        level: The water level.
        config: The level's evaluation settings (its queries, output and attention folders).
        result: What :func:`~attllm_jax.evaluation.pipeline.run_evaluation` returned.
        queries: Its query paths, readability and first-hit ranks.
    """

    level: float
    config: EvalConfig
    result: EvalResult
    queries: LevelQueries


@dataclass(frozen=True)
class SeverityTable:
    """Recall per (level, alpha) on the queries every level could read, and its analysis.

    Attributes:
        compared: The common queries and each level's first-hit ranks on them.
        recalls: ``[L, K, len(recall_values)]`` percentages.
        analysis: :func:`analyse`'s output.
    """

    compared: CommonQueries
    recalls: np.ndarray
    analysis: dict[str, Any]


def _sweep(config: SeverityConfig, out: Path, model, t_start: float) -> dict[str, Any]:
    """Flood, load the model, evaluate every level (stages 1-8 each, one shared store), tabulate, report."""
    log.info("severity settings: %s", json.dumps(asdict(config), default=str))
    flood = _flood_queries(config, out)
    model = model if model is not None else load_eval_model(config.eval)
    runs = [_evaluate_level(config, out, level, model) for level in config.levels]
    table = _tabulate(config, runs)
    _plot(config, out, runs, table)
    severity = severity_results(config, runs, table, flood, time.perf_counter() - t_start)
    written = [out / HEATMAP_FILE]
    for run in runs:
        written += _level_outputs(Path(run.config.output_dir), run.result.results, run.config.attention_dir, out)
    severity[OUTPUTS_KEY] = relative_outputs(out, written)
    atomic_write_json(out / SEVERITY_FILE, severity)
    log.info("severity sweep written to %s (%s)", out / SEVERITY_FILE, out / HEATMAP_FILE)
    return severity


def _flood_queries(config: SeverityConfig, out: Path) -> FloodedQueries:
    """The dry queries flooded procedurally at every level above 0 into ``out/flooded`` (resumable)."""
    t0 = time.perf_counter()
    summary = flood_folder(
        Path(config.eval.queries_folder),
        out / "flooded",
        [v for v in config.levels if v > 0],
        procedural_method(config.seed, config.style),
        method_name="procedural",
        seed=config.seed,
        settings=style_dict(config.style),
    )
    return FloodedQueries(summary, time.perf_counter() - t0)


def _evaluate_level(config: SeverityConfig, out: Path, level: float, model: DescriptorModel) -> LevelRun:
    """One level's evaluation over the whole alpha grid, against the sweep's one store
    (``output_dir/database_store`` by default), into ``out/levels/level_<l>/``."""
    ev = config.eval
    dry = Path(ev.queries_folder)
    queries_dir = dry if level == 0.0 else out / "flooded" / level_name(level)
    level_eval = replace(
        ev,
        queries_folder=str(queries_dir),
        output_dir=str(out / "levels" / level_name(level)),
        attention_dir=_level_attention(config, out, level, queries_dir),
        store_dir=str(ev.resolved_store_dir),
    )
    result = run_evaluation(level_eval, model=model)
    setup_logging(out / "severity.log")  # run_evaluation pointed the log at the level's folder
    log.info("level %g: R@1 per alpha %s", level, [round(float(r), 1) for r in result.retrieval.recalls[:, 0]])
    return LevelRun(level, level_eval, result, _level_queries(queries_dir, result))


def _tabulate(config: SeverityConfig, runs: list[LevelRun]) -> SeverityTable:
    """Recall per (level, alpha) on the common queries, and the best alphas, gains and breaking points."""
    ev = config.eval
    recall_values = list(ev.recall_values)
    compared = common_queries([run.queries for run in runs])
    table = np.array([[recall_from_ranks(ranks, recall_values) for ranks in fh] for fh in compared.first_hit])
    hits = [fh == 0 for fh in compared.first_hit]
    analysis = analyse(config.levels, ev.alphas, recall_values, table, hits, config.bootstrap, config.confidence)
    return SeverityTable(compared, table, analysis)


def _plot(config: SeverityConfig, out: Path, runs: list[LevelRun], table: SeverityTable) -> None:
    """``severity_r1.png``: R@1 over (level, alpha), each level's best alpha framed."""
    ev = config.eval
    model_spec = ModelSpec.from_dict(runs[0].result.results["model"], "results.json model")
    weights = model_spec.provenance.weights or f"checkpoint {ev.checkpoint}"
    breaking = table.analysis["breaking_points"]
    plot_heatmap(
        out / HEATMAP_FILE,
        config.levels,
        ev.alphas,
        table.recalls[:, :, list(ev.recall_values).index(1)],
        [p["best_alpha"] for p in table.analysis["per_level"]],
        f"R@1 (%), {model_spec.family} {model_spec.backbone} ({weights}), attention: "
        f"{config.attention}\nbest alpha framed; R@1 < half dry from level {_fmt(breaking['r1_below_half_dry_alpha0'])}"
        f" (alpha 0); gain <= 0 from level {_fmt(breaking['gain_not_above_zero'])}",
    )


def severity_results(
    config: SeverityConfig, runs: list[LevelRun], table: SeverityTable, flood: FloodedQueries, total_s: float
) -> dict[str, Any]:
    """The content of severity.json (docs/DESIGN.md section 4), but its ``outputs`` list."""
    ev = config.eval
    recall_values = list(ev.recall_values)
    results = [run.result.results for run in runs]
    names = [level_name(v) for v in config.levels]
    return {
        "model": results[0]["model"],
        "num_database": results[0]["num_database"],
        "num_queries": {name: r["num_queries"] for name, r in zip(names, results, strict=True)},
        "num_queries_compared": len(table.compared.paths),
        "dropped_queries": {
            name: {"count": len(d), "paths": d[:MAX_LISTED_DROPPED]}
            for name, d in zip(names, table.compared.dropped, strict=True)
        },
        "levels": list(config.levels),
        "alphas": list(ev.alphas),
        "recall_values": recall_values,
        "positive_dist_threshold": ev.positive_dist_threshold,
        "attention": {
            "source": config.attention,
            "directory": config.attention_dir,
            "queries_with_attention": {
                name: r["attention"]["queries_with_attention"] for name, r in zip(names, results, strict=True)
            },
        },
        "recalls": {
            name: {
                alpha_key(a): {str(n): float(x) for n, x in zip(recall_values, row, strict=True)}
                for a, row in zip(ev.alphas, level_table, strict=True)
            }
            for name, level_table in zip(names, table.recalls, strict=True)
        },
        **table.analysis,
        "bootstrap": {"resamples": config.bootstrap, "confidence": config.confidence, "paired_over": "queries"},
        "flood": {k: flood.summary[k] for k in ("method", "seed", "settings", "counts", "num_failed", "failures")},
        "store": {"directory": str(ev.resolved_store_dir), "status_per_level": [r["store"]["status"] for r in results]},
        "timings_s": {
            "flood": round(flood.seconds, 3),
            "levels": {name: r["timings_s"] for name, r in zip(names, results, strict=True)},
            "total": round(total_s, 3),
        },
        "notes": list(ev.notes)
        + [
            "level 0 is the dry queries as given; flooded levels are procedural (attllm_jax.data.flood), re-encoded",
            "the best alpha is chosen on the queries it is scored on: its gain is optimistic",
            _compared_note(table.compared),
        ],
    }


def _level_queries(queries_dir: Path, result) -> LevelQueries:
    """A level's query paths (listed as its evaluation listed them), readability and first-hit ranks."""
    paths = tuple(list_images(queries_dir))
    readable = np.ones(len(paths), dtype=bool)
    readable[[f["index"] for f in result.results["skipped_images"]["queries"]]] = False
    return LevelQueries(paths, readable, result.retrieval.first_hit)


def _compared_note(compared: CommonQueries) -> str:
    dropped = max((len(d) for d in compared.dropped), default=0)
    if not dropped:
        return f"every level is scored on the same {len(compared.paths)} queries"
    return (
        f"every level is scored on the same {len(compared.paths)} queries, those readable at every level; up to "
        f"{dropped} per level were dropped (dropped_queries); levels/<level>/results.json score each level on its "
        "own readable queries"
    )


def _level_outputs(folder: Path, results: dict[str, Any], attention_dir: str | None, out: Path) -> list[Path]:
    """What the sweep wrote for one level: its eval folder's files and its mask-attention files."""
    files = [folder / rel for rel in results[OUTPUTS_KEY]] + [folder / "results.json", folder / "eval.log"]
    attention = Path(attention_dir) if attention_dir else None
    if attention is not None and attention.resolve().is_relative_to((out / "attention_masks").resolve()):
        files += sorted(attention.glob("*.json"))
    return files


def _fmt(level: float | None) -> str:
    return "none" if level is None else f"{level:g}"


def severity_table(severity: dict[str, Any]) -> str:
    """Plain text: one row per level with R@1 at alpha 0, the best alpha, its R@1 and gain with its interval."""
    lines = [
        f"{'level':<7}{'R@1 a=0':>9}{'best a':>8}{'R@1':>7}{'gain':>8}  interval",
        "-" * 56,
    ]
    for p in severity["per_level"]:
        low, high = p["gain_r1_interval"]
        lines.append(
            f"{p['level']:<7g}{p['r1_alpha0']:9.1f}{p['best_alpha']:8g}{p['best_r1']:7.1f}{p['gain_r1']:+8.1f}"
            f"  [{low:+.1f}, {high:+.1f}]"
        )
    b = severity["breaking_points"]
    lines.append(
        f"dry R@1 {severity['dry_r1']:.1f}; R@1 below half of it from level {_fmt(b['r1_below_half_dry_alpha0'])} "
        f"(alpha 0), {_fmt(b['r1_below_half_dry_best_alpha'])} (best alpha); best alpha's gain not above zero from "
        f"level {_fmt(b['gain_not_above_zero'])} (interval: {_fmt(b['gain_interval_not_above_zero'])})"
    )
    return "\n".join(lines)


def synthetic_severity_config(
    cache_dir: str | Path,
    output_dir: str | Path,
    *,
    synthetic: SyntheticConfig | None = None,
    checkpoint: str | None = None,
    attention: str = "masks",
) -> SeverityConfig:
    """The sweep on the built-in synthetic streets: dry queries, a random-weight model, mask attention.

    The queries are the synthetic benchmark's query views generated with flood level 0 (at most a one-pixel sliver
    of water along the bottom edge, where the waterline's sinusoid dips below the last row); the database and the
    model are the demo's. The notes name the weights and the attention, so those two are set here; change any
    other field of the result with :func:`dataclasses.replace` (``levels``, ``bootstrap`` ... on the sweep,
    ``alphas``, ``recall_values``, ``image_size`` ... on its ``eval``).

    Args:
        cache_dir: Where the benchmark is generated and cached.
        output_dir: The sweep's folder.
        synthetic: The benchmark (default: the demo's streets, dry queries).
        checkpoint: A converted model directory (default: the demo's random-weight model).
        attention: "masks", "dir" or "none" (see :class:`SeverityConfig`).
    """
    bench = generate_benchmark(cache_dir, synthetic or SyntheticConfig(flood_min=0.0, flood_max=0.0))
    notes = (DEMO_NOTES[0].replace("synthetic water", "procedural water at each level"),)
    if checkpoint is None:
        notes += (DEMO_NOTES[1],)
    if attention == "masks":
        notes += ("DEMO: attention is an ORACLE built from the flood masks (water cells weight 0.1), not an LLM.",)
    ev = EvalConfig(
        database_folder=str(bench.database),
        queries_folder=str(bench.queries),
        output_dir=str(output_dir),
        checkpoint=checkpoint,
        alphas=tuple(round(0.1 * k, 1) for k in range(11)),
        image_size=DEMO_IMAGE_SIZE,
        notes=notes,
    )
    return SeverityConfig(eval=ev, attention=attention)
