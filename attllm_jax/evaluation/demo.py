"""The self-contained demo: a synthetic flooded-street benchmark, oracle attention, a random-weight model."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image

from attllm_jax.attention.masks import oracle_grid
from attllm_jax.attention.parse import parse_answer
from attllm_jax.attention.store import make_record
from attllm_jax.data.synthetic import SyntheticBenchmark, SyntheticConfig, generate_benchmark
from attllm_jax.evaluation.config import EvalConfig
from attllm_jax.files import atomic_write_json
from attllm_jax.models.boq import BoQSpec
from attllm_jax.models.image4vpr import ImAgeSpec
from attllm_jax.models.megaloc import MegaLocSpec
from attllm_jax.models.mixvpr import MixVPRSpec
from attllm_jax.models.netvlad import NetVLADSpec
from attllm_jax.models.spec import ModelSpec, Provenance
from attllm_jax.models.supervlad import SuperVLADSpec
from attllm_jax.models.vpr import VPRModel

DEMO_IMAGE_SIZE = 288  # the synthetic views' own height: evaluated without resizing, fast on a CPU
# The random-weight models of --random_model (EvalConfig.random_model) and how the notes name them.
RANDOM_MODEL_NAMES = {
    "cosplace": "CosPlace ResNet-18/512",
    "megaloc": "MegaLoc DINOv2 ViT-B/14 8448-d",
    "boq_dinov2": "BoQ DINOv2 ViT-B/14 12288-d",
    "boq_resnet50": "BoQ ResNet-50 16384-d",
    "mixvpr": "MixVPR ResNet-50 4096-d",
    "netvlad": "NetVLAD VGG-16 4096-d",
    "supervlad": "SuperVLAD DINOv2 ViT-B/14 3072-d",
    "image4vpr": "ImAge DINOv2 ViT-B/14-reg 6144-d",
}
DEMO_NOTES = (
    "DEMO: synthetic flooded streets (procedural facades, synthetic water); not real photographs.",
    "DEMO: model weights are RANDOM (CosPlace ResNet-18/512 built in JAX) unless --checkpoint is given.",
    "DEMO: attention is an ORACLE built from the ground-truth flood masks (water cells weight 0.1, "
    "others 1.0), not an LLM.",
)


def random_model(name: str = "cosplace", seed: int = 0, precision: str = "float32"):
    """A random-weight model without torch or a download (``name`` in :data:`RANDOM_MODEL_NAMES`).

    ``"cosplace"`` is :func:`random_cosplace_model` (NumPy-drawn weights). The
    others are the released architectures (MegaLoc; BoQ with its DINOv2 or ResNet-50 backbone, at its 322x322 /
    384x384 evaluation size; MixVPR 4096-d at 320x320; NetVLAD 4096-d at the image's own size) with the modules'
    own initializers under ``nnx.Rngs(seed)`` (some tens of seconds to initialize on a CPU).

    Args:
        name: the architecture.
        seed: the weights' seed.
        precision: ``"float32"``, ``"tf32"`` or ``"bfloat16"`` (see :mod:`attllm_jax.models.precision`).

    Returns:
        A :class:`~attllm_jax.models.vpr.VPRModel` whose provenance says ``"random (seed N)"``.
    """
    if name == "cosplace":
        return random_cosplace_model(seed, precision=precision)
    spec = random_model_spec(name, seed)
    return VPRModel(spec.build(nnx.Rngs(seed)), spec, precision)


def random_model_spec(name: str, seed: int = 0) -> ModelSpec:
    """The :class:`ModelSpec` of the random model ``name`` (:data:`RANDOM_MODEL_NAMES`), provenance "random"."""
    if name == "cosplace":
        return ModelSpec.cosplace("resnet18", 512, weights=f"random (seed {seed})")
    architectures = {
        "megaloc": ("megaloc", MegaLocSpec.released()),
        "boq_dinov2": ("boq", BoQSpec.released("dinov2")),
        "boq_resnet50": ("boq", BoQSpec.released("resnet50")),
        "mixvpr": ("mixvpr", MixVPRSpec.released(4096)),
        "netvlad": ("netvlad", NetVLADSpec.released(4096)),
        "supervlad": ("supervlad", SuperVLADSpec.released()),
        "image4vpr": ("image4vpr", ImAgeSpec.released()),
    }
    if name not in architectures:
        raise ValueError(f"unknown random model {name!r}; valid: {', '.join(RANDOM_MODEL_NAMES)}")
    family, arch = architectures[name]
    return ModelSpec(family, arch, arch.default_preprocess(), Provenance(weights=f"random (seed {seed})"))


def random_cosplace_model(
    seed: int = 0, backbone: str = "resnet18", descriptor_dim: int = 512, precision: str = "float32"
):
    """A CosPlace network with random weights, deterministic in ``seed`` (no torch, no download).

    The weights are drawn on the host with NumPy into the abstract network (He-normal kernels, zero biases,
    identity BatchNorm statistics, GeM p = 3): initializing through the modules' JAX initializers compiles one
    program per parameter shape, which takes tens of seconds on a small CPU.

    Returns:
        A :class:`~attllm_jax.models.vpr.VPRModel`.
    """
    spec = ModelSpec.cosplace(backbone, descriptor_dim, weights=f"random (seed {seed})")
    abstract = nnx.eval_shape(lambda: spec.build(nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)
    state = jax.tree_util.tree_map_with_path(lambda path, leaf: _random_leaf(path, leaf, rng), state)
    return VPRModel(nnx.merge(graphdef, state), spec, precision)


_CONSTANT_LEAVES = {"bias": 0.0, "mean": 0.0, "scale": 1.0, "var": 1.0, "p": 3.0}


def _random_leaf(path, leaf, rng: np.random.Generator) -> jax.Array:
    name = next(str(p.key) for p in reversed(path) if isinstance(p, jax.tree_util.DictKey))
    if name == "kernel":
        fan_in = int(np.prod(leaf.shape[:-1]))
        return jax.device_put(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(leaf.dtype))
    if name in _CONSTANT_LEAVES:
        return jax.device_put(np.full(leaf.shape, _CONSTANT_LEAVES[name], leaf.dtype))
    raise ValueError(f"no random initializer for parameter {jax.tree_util.keystr(path)}")


def write_oracle_attention(benchmark: SyntheticBenchmark, directory: str | os.PathLike) -> Path:
    """Writes one attention file per query (our per-image format, provider "oracle"); existing files are kept."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for mask_path in sorted(benchmark.masks.glob("*.png")):
        target = directory / f"{mask_path.stem}.json"
        if target.exists():
            continue
        with Image.open(mask_path) as image:
            mask = np.asarray(image.convert("L")) > 127
        answer = oracle_grid(mask)
        record = make_record(
            image_path=f"{mask_path.stem}.jpg",
            model="oracle-flood-mask",
            raw_text=json.dumps(answer),
            parsed=parse_answer(answer),
            provider="oracle",
            prompt_id="oracle_flood_mask",
            prompt_version="1",
            city="synthetic",
        )
        atomic_write_json(target, record)
    return directory


def prepare_demo(
    cache_dir: str | os.PathLike, synthetic: SyntheticConfig | None = None
) -> tuple[SyntheticBenchmark, Path]:
    """Generates (or reuses) the synthetic benchmark and its oracle attention files.

    Returns:
        The benchmark and the oracle annotation directory.
    """
    benchmark = generate_benchmark(cache_dir, synthetic)
    return benchmark, write_oracle_attention(benchmark, benchmark.root / "attention_oracle")


def demo_config(
    cache_dir: str | os.PathLike, output_dir: str | os.PathLike, demo_clutter: int = 0, **overrides
) -> EvalConfig:
    """The demo's evaluation settings (any field can be overridden, e.g. ``checkpoint`` or ``alphas``).

    ``demo_clutter``: clutter objects per database view (the benchmark's clutter variant, whose oracle masks
    answer ``--symmetric_k``'s database attention unless ``db_masks`` is given); 0 = the default demo.
    """
    synthetic = SyntheticConfig(database_clutter=int(demo_clutter)) if demo_clutter else None
    benchmark, attention_dir = prepare_demo(cache_dir, synthetic)
    if benchmark.database_masks is not None and overrides.get("db_masks") is None and not overrides.get("db_provider"):
        overrides["db_masks"] = str(benchmark.database_masks)
    config = EvalConfig(
        database_folder=str(benchmark.database),
        queries_folder=str(benchmark.queries),
        output_dir=str(output_dir),
        attention_dir=str(attention_dir),
        alphas=(0.0, 0.25, 0.5, 0.75, 1.0),
        recall_values=(1, 5, 10, 20),
        positive_dist_threshold=25.0,
        image_size=DEMO_IMAGE_SIZE,
        notes=DEMO_NOTES,
    )
    name = overrides.get("random_model", "cosplace")
    if overrides.get("checkpoint") is not None:
        notes = (DEMO_NOTES[0], DEMO_NOTES[2])
    else:
        weights = DEMO_NOTES[1].replace(RANDOM_MODEL_NAMES["cosplace"], RANDOM_MODEL_NAMES.get(name, name))
        notes = (DEMO_NOTES[0], weights, DEMO_NOTES[2])
    if name != "cosplace" and overrides.get("checkpoint") is None:
        config = replace(config, image_size=None)  # the family's own evaluation size (DEMO_IMAGE_SIZE is CosPlace's)
    return replace(config, notes=notes, **overrides)
