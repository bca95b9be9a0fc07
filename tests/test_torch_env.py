"""The pinned torch 2.13.0 (CPU) / torchvision 0.28.0 pair: bare ``import torchvision`` fails, the workaround works."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.torch
REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)


def test_import_torchvision_works_next_to_the_cpu_torch_wheel():
    proc = _python(
        "from benchmarks.torch_env import import_torchvision\n"
        "tv = import_torchvision()\n"
        "import torch\n"
        "print(tv.models.resnet18(weights=None).eval()(torch.zeros(1, 3, 32, 32)).shape)"
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([1, 1000])" in proc.stdout


def test_the_reason_is_documented_where_users_meet_it():
    bare = _python("import torchvision")
    if bare.returncode == 0:
        pytest.skip("this torchvision imports cleanly: nothing to work around")
    assert "torchvision::nms" in bare.stderr
    from benchmarks.torch_env import WHY

    readme = (REPO / "README.md").read_text()
    assert "import_torchvision" in readme and "torch==2.14.1 torchvision==0.29.1" in readme
    assert "declare_missing_torchvision_ops" in WHY
