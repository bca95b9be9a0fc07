"""Helpers of the PyTorch-reference tests of the model families (imported after ``pytest.importorskip("torch")``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def nhwc(x) -> np.ndarray:
    """A torch ``[B, C, H, W]`` tensor as a contiguous NumPy ``[B, H, W, C]`` array."""
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())


def convert_and_load_without_torch(
    tmp_path: Path,
    converter: str,
    state_dict: dict,
    images,
    attention,
    flags: tuple[str, ...] = (),
    source_name: str = "model.safetensors",
    prelude: str = "",
    outputs: str = "np.stack([m(x), m(x, a, 0.5)])",
) -> tuple[dict, np.ndarray]:
    """Runs ``converters/<converter>.py`` on ``state_dict`` saved as safetensors, then ``aj.load_model``, in one
    subprocess where ``import torch`` fails (neither converting a .safetensors file nor loading may need torch).

    Args:
        tmp_path: a scratch folder.
        converter: the script's name (``"megaloc"``).
        state_dict: the upstream-keyed torch tensors.
        images: torch ``[B, 3, H, W]`` images given to the loaded model as ``x`` (NHWC).
        attention: torch ``[B, h, w]`` attention maps, given as ``a``.
        flags: the converter's flags besides ``--checkpoint`` and ``--output``.
        source_name: the safetensors file's name.
        prelude: Python run before the converter (e.g. a patched option).
        outputs: the expression of the loaded model ``m`` whose value is returned.

    Returns:
        ``(config.json as a dict, the value of outputs)``.
    """
    from safetensors.torch import save_file

    source = tmp_path / source_name
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(source))
    out = tmp_path / "model"
    np.save(tmp_path / "images.npy", nhwc(images))
    np.save(tmp_path / "attention.npy", attention.numpy())
    argv = [f"converters/{converter}.py", f"--checkpoint={source}", f"--output={out}", *flags]
    script = (
        "import runpy, sys\n"
        "sys.modules['torch'] = None  # neither the conversion of a .safetensors file nor loading needs torch\n"
        f"{prelude}"
        "sys.path.insert(0, 'converters')  # as `python converters/x.py` puts the script's folder first\n"
        f"sys.argv = {argv!r}\n"
        "try:\n"
        f"    runpy.run_path({argv[0]!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "import numpy as np, jax\n"
        "jax.config.update('jax_default_matmul_precision', 'highest')\n"
        "import attllm_jax as aj\n"
        f"m = aj.load_model({str(out)!r})\n"
        f"x = np.load({str(tmp_path / 'images.npy')!r}); a = np.load({str(tmp_path / 'attention.npy')!r})\n"
        f"np.save({str(tmp_path / 'd.npy')!r}, {outputs})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["source_file"] == source.name
    return config, np.load(tmp_path / "d.npy")
