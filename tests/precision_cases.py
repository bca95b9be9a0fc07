"""Small networks of every family with NumPy-drawn weights, and the inputs the precision tests feed them.

Used by ``tests/test_precision.py`` and by ``tests/data/precision_v0_2/make_expected.py.txt``, which ran this file
against the code before the precision policy (commit 4a689ad) to record ``expected.npz``. Only the public API of
that release is used here (specs, ``nnx.split`` / ``merge``), so the same weights are drawn before and after.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attllm_jax.models.boq import BoQSpec
from attllm_jax.models.dinov2 import DinoV2Config
from attllm_jax.models.heads import CnnSpec
from attllm_jax.models.megaloc import MegaLocSpec
from attllm_jax.models.salad import SaladSpec
from attllm_jax.models.spec import ModelSpec

TINY_DINO = DinoV2Config(embed_dim=64, depth=2, num_heads=2, ffn_hidden_dim=128, pos_embed_grid=6)
SALAD_HEAD = dict(num_clusters=8, cluster_dim=16, token_dim=32, hidden_dim=64)

# name -> (family, architecture, input size [H, W]); the CNNs are full-size torchvision trunks on small images.
CASES = {
    "cosplace_resnet18": ("cosplace", CnnSpec("resnet18", 64), (64, 96)),
    "cosplace_vgg16": ("cosplace", CnnSpec("vgg16", 64), (64, 96)),
    "eigenplaces_resnet50": ("eigenplaces", CnnSpec("resnet50", 128), (64, 96)),
    "salad": ("salad", SaladSpec(dinov2=TINY_DINO, **SALAD_HEAD), (56, 84)),
    "megaloc": ("megaloc", MegaLocSpec(dinov2=TINY_DINO, **SALAD_HEAD, descriptor_dim=48), (60, 90)),
    "boq_dinov2": (
        "boq",
        BoQSpec(dinov2=TINY_DINO, proj_channels=64, num_queries=8, num_layers=2, row_dim=4, num_heads=1),
        (56, 70),
    ),
    "boq_resnet50": (
        "boq",
        BoQSpec(
            dinov2=None,
            resnet_layers=(1, 1, 1),
            resnet_width=16,
            proj_channels=64,
            num_queries=8,
            num_layers=2,
            row_dim=4,
            num_heads=1,
        ),
        (64, 64),
    ),
}
NUM_IMAGES = 3
ATTENTION_GRID = (5, 7)
ALPHAS = (0.0, 0.5, 1.0)


def case_spec(name: str) -> ModelSpec:
    family, arch, _ = CASES[name]
    return ModelSpec(family, arch, arch.default_preprocess())


def case_net(name: str, seed: int = 0) -> nnx.Module:
    """The case's network with weights N(0, 0.05) per leaf in state order (+1 for BatchNorm variances and every
    norm scale, 0.5 + N(0, 0.05) for layer-scale gammas, N(0, 1) for BoQ's learned queries), GeM p = 3."""
    graphdef, state = nnx.split(nnx.eval_shape(case_spec(name).build))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        key = jax.tree_util.keystr(path)
        value = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
        if "var" in key or "scale" in key:
            value += 1.0
        elif "gamma" in key:
            value += 0.5
        elif "queries" in key:
            value *= 20.0
        elif key.endswith("['p']") or "'p'" in key:
            value = np.full(leaf.shape, 3.0, np.float32)
        return jnp.asarray(value)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def street_images(height: int, width: int, count: int = NUM_IMAGES, seed: int = 0) -> np.ndarray:
    """``count`` ImageNet-normalized views ``[count, height, width, 3]`` of the demo's synthetic flooded streets.

    Rendered with the demo generator's building and facade painters (:mod:`attllm_jax.data.synthetic`), so they
    have a photo's statistics (sky, facades, windows, water) rather than white noise.
    """
    from attllm_jax.data import synthetic

    rng = np.random.default_rng(seed)
    strip = synthetic._facade_strip(rng, 60.0)
    out = []
    for i in range(count):
        view = synthetic._render_view(strip, 10.0 + 12.0 * i, 1.0 + 0.1 * i, height, width)
        out.append((view - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    return np.stack(out).astype(np.float32)


def attention_maps(seed: int = 0) -> np.ndarray:
    """``[NUM_IMAGES, 5, 7]`` maps in ``[0, 2]`` with a few strong (near 2) and weak (near 0) cells."""
    rng = np.random.default_rng(seed + 1)
    maps = rng.uniform(0.0, 2.0, (NUM_IMAGES, *ATTENTION_GRID)).astype(np.float32)
    maps[:, 0, :] = 0.05  # sky: noise
    maps[:, 2, 3] = 1.95  # a distinctive facade
    return maps
