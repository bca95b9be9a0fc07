"""What JAX will run on here: backend, devices, default precisions and the versions in use.

    python -m experiments.doctor            # e.g. after pip install -e ".[cuda]": is the GPU actually used?
    python -m experiments.doctor --check    # also runs one float32 matmul at each precision and reports its error

Prints one ``name: value`` line per item. A GPU or TPU install whose backend prints ``cpu`` did not find its
plugin (wrong CUDA driver, jax and plugin versions that do not match, ``JAX_PLATFORMS`` set): see the README.

When the backend cannot start at all (``JAX_PLATFORMS=tpu`` on a machine without a TPU, ``JAX_PLATFORMS=cuda``
without the CUDA plugin), the report says so in its ``backend`` line, names what JAX finds without
``JAX_PLATFORMS`` (checked in a child process), still lists the versions, and exits with status 1.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys

from absl import app, flags

from experiments import cli

flags.DEFINE_bool("check", False, "Also time one [1024 x 1024] matmul per precision and report its error.")
FLAGS = flags.FLAGS

PACKAGES = ("jax", "jaxlib", "flax", "numpy", "orbax.checkpoint", "faiss", "torch")


def versions() -> dict[str, str]:
    """The version of each package of :data:`PACKAGES` (``"not installed"`` when it cannot be imported)."""
    out = {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception:  # an optional package may fail to import in many ways (missing, broken CUDA libs)
            out[name] = "not installed"
            continue
        out[name] = str(getattr(module, "__version__", "unknown"))
    return out


def without_jax_platforms(timeout_s: float = 120.0) -> str:
    """What JAX finds when ``JAX_PLATFORMS`` is unset: ``"backend cpu, 1 device (cpu)"``, from a child process
    (a backend that failed to start cannot be retried in this one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "JAX_PLATFORM_NAME")}
    code = (
        "import jax; d = jax.devices(); "
        "print(f'backend {jax.default_backend()}, {len(d)} device(s) ({d[0].device_kind})')"
    )
    try:
        child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"no answer within {timeout_s:g} s"
    if child.returncode != 0:
        return "JAX cannot start any backend either: " + (child.stderr.strip().splitlines() or ["?"])[-1]
    return child.stdout.strip()


def broken_backend_report(problem: str) -> list[tuple[str, str]]:
    """The report when the backend cannot start: the problem, what would run instead, the environment, versions."""
    return [
        ("python", f"{sys.version.split()[0]} ({platform.machine()}, {os.cpu_count()} cores)"),
        ("backend", f"CANNOT START: {problem}"),
        ("without JAX_PLATFORMS", without_jax_platforms()),
        ("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "(unset)")),
        ("XLA_FLAGS", os.environ.get("XLA_FLAGS", "(unset)")),
        *versions().items(),
    ]


def report() -> list[tuple[str, str]]:
    """``(name, value)`` lines: platform, backend, devices, precisions, environment and versions."""
    import jax

    from attllm_jax.models.precision import DEFAULT_PRECISION, MATMUL_PRECISION, runtime_summary

    devices = jax.devices()
    lines = [
        ("python", f"{sys.version.split()[0]} ({platform.machine()}, {os.cpu_count()} cores)"),
        ("backend", jax.default_backend()),
        ("devices", ", ".join(f"{d.id}: {d.device_kind}" for d in devices)),
        ("processes", f"{jax.process_count()} (this is {jax.process_index()})"),
        ("runtime", runtime_summary(DEFAULT_PRECISION)),
        ("default dtype", "float32 (jax_enable_x64 off)" if not jax.config.jax_enable_x64 else "float64 (x64 on)"),
        ("jax_default_matmul_precision", str(jax.config.jax_default_matmul_precision or "backend default")),
        (
            "model precisions",
            ", ".join(f"{name} -> matmul {matmul}" for name, matmul in MATMUL_PRECISION.items())
            + f" (default {DEFAULT_PRECISION})",
        ),
        ("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "(unset)")),
        ("XLA_FLAGS", os.environ.get("XLA_FLAGS", "(unset)")),
    ]
    lines += [(name, version) for name, version in versions().items()]
    return lines


def matmul_check(size: int = 1024) -> list[tuple[str, str]]:
    """Max relative error of a ``[size, size]`` float32 matmul at each model precision against float64 NumPy."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    from attllm_jax.models.precision import MATMUL_PRECISION, backbone_dtype

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(size, size)).astype(np.float32), rng.normal(size=(size, size)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    lines = []
    for precision, matmul in MATMUL_PRECISION.items():
        dtype = backbone_dtype(precision)

        def product(x, y, dtype=dtype, matmul=matmul):
            with jax.default_matmul_precision(matmul):
                return jnp.matmul(x.astype(dtype), y.astype(dtype), preferred_element_type=jnp.float32)

        fn = jax.jit(product)
        x, y = jax.device_put(a), jax.device_put(b)
        fn(x, y).block_until_ready()
        start = time.perf_counter()
        out = np.asarray(fn(x, y).block_until_ready())
        seconds = time.perf_counter() - start
        error = float(np.max(np.abs(out - exact)) / np.max(np.abs(exact)))
        gflops = 2 * size**3 / seconds / 1e9
        lines.append((f"matmul {precision}", f"max rel error {error:.1e}, {gflops:.0f} GFLOP/s"))
    return lines


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    problem = cli.backend_error()
    if problem:
        lines = broken_backend_report(problem)
    else:
        lines = report() + (matmul_check() if FLAGS.check else [])
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name + ':':<{width + 1}} {value}")
    return 1 if problem else 0


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-doctor``, also ``python -m experiments.doctor``)."""
    cli.run_command("doctor", main, cli.module_help(__doc__, __name__), argv)


if __name__ == "__main__":
    run()
