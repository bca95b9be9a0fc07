"""The accelerator check on the CPU at tiny sizes: every row of its table is printed with values."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.accelerator_check import FAMILY_MODELS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.torch
def test_the_tiny_accelerator_check_prints_every_row(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "check.json"
    args = [sys.executable, "-m", "experiments.accelerator_check", "--tiny", "--cache_dir", str(tmp_path / "cache"),
            "--output_json", str(out)]  # fmt: skip
    proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=1500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    rows = json.loads(out.read_text())["rows"]
    printed = [line for line in output.splitlines() if line.count(" | ") == 2]
    assert len(printed) == len(rows)  # every row on stdout too
    by_key = {(r["section"], r["item"]): r for r in rows}
    assert by_key[("backend", "cpu")]["count"] == 1
    for name in FAMILY_MODELS:
        parity, precision = by_key[("parity", name)], by_key[("precision", name)]
        # on the CPU the "device" is the CPU: the same program, so the same descriptors
        assert parity["cos_min"] > 1 - 1e-6 and parity["max_abs"] < 1e-5, parity
        assert 0.99 < precision["cos_bf16"] <= 1 + 1e-6 and precision["cos_tf32"] > 1 - 1e-6, precision
        assert min(precision["ips_f32"], precision["ips_tf32"], precision["ips_bf16"]) > 0
    search = by_key[("search", "20000x512")]
    assert search["agreement"] == 1.0 and search["qps_jax"] > 0 and search["qps_faiss"] > 0
    bench = by_key[("bench", "cosplace")]
    assert bench["batch"] == 2 and bench["ips_f32"] > 0 and bench["ips_torch_cpu"] > 0
    extraction = by_key[("extraction", "cosplace r18")]
    assert extraction["bound"] == ("host decode" if extraction["host_ips"] < extraction["model_ips"] else "model")
