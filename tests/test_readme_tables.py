"""The README's headline tables are what their commands print now (slow: run before every release).

Each test runs the README's own command in a fresh directory (so the default ``cache/`` and ``outputs/`` paths are
those of the README) and compares with the table or sentence parsed from README.md; a stale row fails. Commands
and their time on a loaded 2-core CPU: the demo (~1.5 min), the severity sweep (~5 min), the tuning (~3 min), the
seven random-weight families (~1-22 min each).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from attllm_jax.evaluation.config import alpha_key

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.slow


def run_command(args: list[str], cwd: Path, timeout_s: float) -> str:
    """Runs ``python -m <args>`` from ``cwd`` with this checkout importable; returns stdout (killed on timeout)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def code_block_after(marker: str) -> list[str]:
    """The lines of the first fenced block after the README line containing ``marker``."""
    rest = README[README.index(marker) :]
    block = rest[rest.index("```\n") + 4 :]
    return block[: block.index("```")].rstrip("\n").split("\n")


def assert_contains_block(stdout: str, block: list[str]) -> None:
    lines = stdout.rstrip("\n").split("\n")
    for start in range(len(lines) - len(block) + 1):
        if lines[start : start + len(block)] == block:
            return
    pytest.fail("README block not printed by the command:\n" + "\n".join(block) + "\n--- printed:\n" + stdout)


def test_demo_table(tmp_path):
    block = code_block_after("evaluates a CosPlace ResNet-18/512 with **random weights**")
    assert block[0].startswith("DEMO:") and block[-1] == "results: outputs/demo/results.json"
    assert_contains_block(run_command(["experiments.eval"], tmp_path, 900), block)


def test_severity_table(tmp_path):
    block = code_block_after("With no dataset flags it runs on the built-in synthetic streets")
    assert block[1].startswith("level") and len(block) == 9
    assert_contains_block(run_command(["experiments.severity"], tmp_path, 1800), block)


def _number(text: str) -> float:
    return float(text.replace("+", ""))


def test_tuning_sentence(tmp_path):
    sentence = " ".join(README[README.index("On the demo (random weights, oracle attention") :].split())
    pattern = (
        r"it picks alpha ([\d.]+) \(R@1 ([\d.]+) on all (\d+) queries\) and estimates a held-out R@1 of ([\d.]+) "
        r"\(95% CI ([\d.]+)\.\.([\d.]+)\), ([+-][\d.]+) over alpha = 0 \(([+-][\d.]+)\.\.([+-][\d.]+)\), "
        r"McNemar p = ([\d.]+)\."
    )
    found = re.search(pattern, sentence)
    assert found, sentence[:400]
    alpha, r1, queries, held, lo, hi, gain, glo, ghi, p = found.groups()
    run_command(["experiments.tune", "--output_dir", "tune_out"], tmp_path, 1800)
    result = json.loads((tmp_path / "tune_out" / "tuning.json").read_text())
    best, cv = result["best"], result["cv"]
    assert f"{best['alpha']:.2g}" == alpha and best["recalls"]["1"] == _number(r1)
    assert result["num_queries"] == int(queries)
    assert f"{cv['heldout']['1']['mean']:.1f}" == held
    assert [f"{v:.1f}" for v in cv["heldout"]["1"]["ci95"]] == [lo, hi]
    assert f"{cv['gain_vs_alpha0']['1']['mean']:+.1f}" == gain
    assert [f"{v:+.1f}" for v in cv["gain_vs_alpha0"]["1"]["ci95"]] == [glo, ghi]
    assert f"{cv['mcnemar_p']:.2g}" == p


RANDOM_MODELS = {
    "megaloc": "MegaLoc (ViT-B/14, 8448-d)",
    "boq_dinov2": "BoQ DINOv2 (ViT-B/14, 12288-d)",
    "boq_resnet50": "BoQ ResNet-50 (16384-d)",
    "mixvpr": "MixVPR (ResNet-50, 4096-d)",
    "netvlad": "NetVLAD (VGG-16, 4096-d)",
    "supervlad": "SuperVLAD (ViT-B/14, 3072-d)",
    "image4vpr": "ImAge (ViT-B/14 with registers, 6144-d)",
}


def random_model_rows(label: str) -> dict[str, list[float]]:
    """``{alpha key: [R@1, R@5, R@10, R@20]}`` of one family in the README's random-model table."""
    rows, current = {}, None
    for line in README.split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("| ") else []
        if len(cells) != 6 or cells[1] == "alpha" or set(cells[1]) <= {"-", " "}:
            continue
        current = cells[0] or current
        if current == label:
            rows[alpha_key(float(cells[1]))] = [float(c) for c in cells[2:]]
    return rows


@pytest.mark.parametrize("name", sorted(RANDOM_MODELS))
def test_random_model_table(name, tmp_path):
    expected = random_model_rows(RANDOM_MODELS[name])
    assert len(expected) == 5, expected
    run_command(["experiments.eval", "--random_model", name, "--output_dir", "out"], tmp_path, 1800)
    recalls = json.loads((tmp_path / "out" / "results.json").read_text())["recalls"]
    got = {a: [recalls[a][n] for n in ("1", "5", "10", "20")] for a in expected}
    assert got == expected
