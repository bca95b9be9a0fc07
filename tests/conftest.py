"""Shared pytest set-up: float32 parity at the highest matmul precision, importable torchvision."""

import jax

from benchmarks.torch_env import declare_missing_torchvision_ops

jax.config.update("jax_default_matmul_precision", "highest")

declare_missing_torchvision_ops()
