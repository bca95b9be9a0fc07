"""The severity sweep: the bootstrap and breaking-point rules by hand, then a small synthetic sweep where recall must
fall with depth, whose reported best alphas, gains and breaking points must follow from its own table."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from attllm_jax.data.synthetic import SyntheticConfig
from attllm_jax.evaluation.config import alpha_key
from attllm_jax.evaluation.severity import (
    LevelQueries,
    analyse,
    common_queries,
    first_level_from_which,
    paired_bootstrap,
    run_severity,
    synthetic_severity_config,
)

REPO = Path(__file__).resolve().parents[1]
SMALL = SyntheticConfig(
    num_streets=2, street_length_m=100.0, num_queries=10, image_height=72, image_width=96, flood_min=0.0,
    flood_max=0.0, seed=7,
)  # fmt: skip


def test_paired_bootstrap_by_hand():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
    b = np.array([1, 0, 0, 1, 0, 0, 1, 0], bool)
    gain, low, high = paired_bootstrap(a, b, 4000, 0.95, seed=0)
    assert gain == pytest.approx(25.0)  # 2 more hits of 8
    assert 0.0 <= low < 25.0 < high <= 62.5  # never below 0 (no query got worse); a resample holds at most 5 gains
    assert paired_bootstrap(b, b, 100, 0.95) == (0.0, 0.0, 0.0)
    ones = np.ones(5, bool)
    assert paired_bootstrap(ones, ~ones, 50, 0.9) == (100.0, 100.0, 100.0)


def test_first_level_from_which():
    levels = [0.0, 0.2, 0.4, 0.6]
    assert first_level_from_which(levels, [False, False, True, True]) == 0.4
    assert first_level_from_which(levels, [False, True, False, True]) == 0.6  # from which on: the dip at 0.2 is noise
    assert first_level_from_which(levels, [True, True, True, False]) is None  # not at the deepest level
    assert first_level_from_which(levels, [True] * 4) == 0.0


def test_analyse_a_hand_made_table():
    levels, alphas = [0.0, 0.3, 0.6], [0.0, 0.5, 1.0]
    # 4 queries; R@1 hits per level and alpha
    hits = [
        np.array([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]], bool),  # dry: 75, 75, 50 -> best alpha 0 (tie)
        np.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]], bool),  # 25, 50, 75 -> best 1.0, gain +50
        np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool),  # 0, 25, 0 -> best 0.5, gain +25
    ]
    recalls = np.stack([h.mean(1, keepdims=True) * 100 for h in hits])  # [L, K, 1]
    result = analyse(levels, alphas, [1], recalls, hits, resamples=500)
    best = [p["best_alpha"] for p in result["per_level"]]
    assert best == [0.0, 1.0, 0.5]
    assert [p["gain_r1"] for p in result["per_level"]] == [0.0, 50.0, 25.0]
    assert result["dry_r1"] == 75.0
    bp = result["breaking_points"]
    assert bp["r1_below_half_dry_alpha0"] == 0.3  # 25 < 37.5 at 0.3 and 0 at 0.6
    assert bp["r1_below_half_dry_best_alpha"] == 0.6  # 75 at 0.3 is not below; 25 at 0.6 is
    assert bp["gain_not_above_zero"] is None  # still +25 at the deepest level
    with pytest.raises(ValueError, match="start at 0"):
        analyse([0.3, 0.6], alphas, [1], recalls[1:], hits[1:])


def _recompute_breaking_points(severity):
    """An independent reading of severity.json's table: the documented rules, applied to its recalls."""
    levels, alphas = severity["levels"], severity["alphas"]
    r1 = np.array([[severity["recalls"][f"level_{v:g}"][alpha_key(a)]["1"] for a in alphas] for v in levels])
    half = r1[0, alphas.index(0.0)] / 2
    best = [alphas[int(np.flatnonzero(row == row.max())[0])] for row in r1]  # first max = smallest alpha (sorted)
    gains = [row.max() - row[alphas.index(0.0)] for row in r1]

    def from_which(lv, cond):
        found = None
        for level, c in reversed(list(zip(lv, cond, strict=True))):
            if not c:
                break
            found = level
        return found

    return (
        best,
        gains,
        {
            "r1_below_half_dry_alpha0": from_which(levels, r1[:, alphas.index(0.0)] < half),
            "r1_below_half_dry_best_alpha": from_which(levels, r1.max(1) < half),
            "gain_not_above_zero": from_which(levels[1:], [g <= 0 for g in gains[1:]]),
        },
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("severity")
    config = synthetic_severity_config(root / "cache", root / "out", synthetic=SMALL)
    ev = replace(config.eval, alphas=(0.0, 0.5, 1.0), recall_values=(1, 5), image_size=72)
    config = replace(config, eval=ev, levels=(0.5, 0.9, 0.0), bootstrap=300)
    return root, config, run_severity(config)


def test_recall_falls_with_depth_and_the_report_matches_the_table(sweep):
    root, _, severity = sweep
    assert severity["levels"] == [0.0, 0.5, 0.9]  # sorted, dry first
    r1_alpha0 = [severity["recalls"][f"level_{v:g}"]["0.0"]["1"] for v in severity["levels"]]
    r5_alpha0 = [severity["recalls"][f"level_{v:g}"]["0.0"]["5"] for v in severity["levels"]]
    assert r1_alpha0[0] > r1_alpha0[2] and r5_alpha0[0] > r5_alpha0[2]  # the deepest water hurts
    assert r1_alpha0[0] >= r1_alpha0[1] >= r1_alpha0[2]
    best, gains, breaking = _recompute_breaking_points(severity)
    assert [p["best_alpha"] for p in severity["per_level"]] == best
    np.testing.assert_allclose([p["gain_r1"] for p in severity["per_level"]], gains, atol=1e-6)
    for key, value in breaking.items():
        assert severity["breaking_points"][key] == value, key
    for p in severity["per_level"]:
        low, high = p["gain_r1_interval"]
        assert low <= p["gain_r1"] <= high
    on_disk = json.loads((root / "out" / "severity.json").read_text())
    assert on_disk["breaking_points"] == severity["breaking_points"]
    assert (root / "out" / "severity_r1.png").stat().st_size > 1000


def test_one_store_shared_by_every_level_and_files_per_level(sweep):
    root, _, severity = sweep
    assert severity["store"]["status_per_level"] == ["created", "reused", "reused"]
    for level in ("level_0", "level_0.5", "level_0.9"):
        results = json.loads((root / "out" / "levels" / level / "results.json").read_text())
        assert results["num_queries"] == SMALL.num_queries and results["store"]["chunks_computed"] == (
            1 if level == "level_0" else 0
        )
    assert severity["attention"]["queries_with_attention"] == {"level_0": 0, "level_0.5": 10, "level_0.9": 10}
    assert len(list((root / "out" / "attention_masks" / "level_0.5").glob("*@*.json"))) == SMALL.num_queries


def test_rerun_resumes_and_reproduces(sweep):
    root, config, severity = sweep
    again = run_severity(config)
    assert again["recalls"] == severity["recalls"] and again["breaking_points"] == severity["breaking_points"]
    assert again["flood"]["counts"]["level_0.5"] == {"written": 0, "existing": SMALL.num_queries, "failed": 0}


def test_bad_settings_are_rejected_before_work(tmp_path):
    base = [sys.executable, "-m", "experiments.severity", f"--output_dir={tmp_path / 'o'}", f"--cache_dir={tmp_path}"]
    for bad in ("--levels=0.2,1.5", "--alphas=0,2", "--attention=dir"):
        proc = subprocess.run([*base, bad], cwd=REPO, capture_output=True, text=True, timeout=120)
        flag = bad.split("=")[0]
        assert proc.returncode != 0 and flag in proc.stderr, (bad, proc.stderr[-500:])
    assert not list(tmp_path.glob("synthetic_flood_*"))  # rejected before the benchmark was generated


def test_attention_dir_needs_a_folder_per_flooded_level(tmp_path):
    from attllm_jax.evaluation.config import EvalConfig
    from attllm_jax.evaluation.severity import SeverityConfig

    (tmp_path / "att" / "level_0.2").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    ev = EvalConfig(
        database_folder=str(tmp_path / "data"), queries_folder=str(tmp_path / "data"), output_dir=str(tmp_path / "o")
    )
    with pytest.raises(FileNotFoundError, match="level_0.5"):
        SeverityConfig(ev, levels=(0.2, 0.5), attention="dir", attention_dir=str(tmp_path / "att")).validated()
    with pytest.raises(ValueError, match="above 0"):
        SeverityConfig(ev, levels=(0.0,)).validated()
    ok = SeverityConfig(
        replace(ev, alphas=(1.0, 0.5)), levels=(0.2,), attention="dir", attention_dir=str(tmp_path / "att")
    )
    assert ok.validated().eval.alphas == (0.0, 0.5, 1.0) and ok.validated().levels == (0.0, 0.2)


def test_common_queries_by_hand():
    dry = LevelQueries(("a.jpg", "b.jpg", "c.jpg"), np.array([True, False, True]), np.array([[0, -1, 2], [1, -1, 0]]))
    wet = LevelQueries(("a.jpg", "c.jpg"), np.array([True, True]), np.array([[-1, 0], [0, 3]]))
    compared = common_queries([dry, wet])
    assert compared.paths == ("a.jpg", "c.jpg") and compared.dropped == [["b.jpg"], []]
    np.testing.assert_array_equal(compared.first_hit[0], [[0, 2], [1, 0]])
    np.testing.assert_array_equal(compared.first_hit[1], [[-1, 0], [0, 3]])


def test_an_unreadable_dry_query_is_dropped_from_every_level(tmp_path):
    base = synthetic_severity_config(tmp_path / "cache", tmp_path / "out", synthetic=SMALL)
    queries = tmp_path / "queries"
    shutil.copytree(base.eval.queries_folder, queries)
    bad = sorted(queries.glob("*.jpg"))[3]
    bad.write_bytes(b"not a photo")
    config = replace(base, bootstrap=50, levels=(0.5,))
    ev = replace(config.eval, queries_folder=str(queries), alphas=(0.0, 1.0), recall_values=(1, 5), image_size=72)
    config = replace(config, eval=ev)
    severity = run_severity(config)
    n = SMALL.num_queries
    assert severity["num_queries"] == {"level_0": n, "level_0.5": n - 1}  # the unreadable query is not flooded
    assert severity["num_queries_compared"] == n - 1
    assert severity["dropped_queries"] == {
        "level_0": {"count": 1, "paths": [bad.name]},
        "level_0.5": {"count": 0, "paths": []},
    }
    assert any(note.startswith(f"every level is scored on the same {n - 1} queries") for note in severity["notes"])
    assert severity["recalls"]["level_0"]["0.0"]["5"] > 0  # so that the rescaling below is not 0 == 0
    for level, scale in (("level_0", n / (n - 1)), ("level_0.5", 1.0)):
        own = json.loads((tmp_path / "out" / "levels" / level / "results.json").read_text())["recalls"]
        for alpha in ("0.0", "1.0"):
            for cut in ("1", "5"):
                assert severity["recalls"][level][alpha][cut] == pytest.approx(own[alpha][cut] * scale)
