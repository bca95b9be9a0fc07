"""The self-contained demo: a synthetic flooded-street benchmark, oracle attention, a random-weight model."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from attllm_jax.attention.masks import oracle_grid
from attllm_jax.attention.parse import parse_answer
from attllm_jax.attention.store import make_record, write_json_atomic
from attllm_jax.data.synthetic import SyntheticBenchmark, SyntheticConfig, generate_benchmark
from attllm_jax.evaluation.config import EvalConfig

DEMO_IMAGE_SIZE = 288  # the synthetic views' own height: evaluated without resizing, fast on a CPU
DEMO_NOTES = (
    "DEMO: synthetic flooded streets (procedural facades, synthetic water); not real photographs.",
    "DEMO: model weights are RANDOM (CosPlace ResNet-18/512 built in JAX) unless --checkpoint is given.",
    "DEMO: attention is an ORACLE built from the ground-truth flood masks (water cells weight 0.1, "
    "others 1.0), not an LLM.",
)


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
        write_json_atomic(target, record)
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


def demo_config(cache_dir: str | os.PathLike, output_dir: str | os.PathLike, **overrides) -> EvalConfig:
    """The demo's evaluation settings (any field can be overridden, e.g. ``checkpoint`` or ``alphas``)."""
    benchmark, attention_dir = prepare_demo(cache_dir)
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
    notes = DEMO_NOTES if overrides.get("checkpoint") is None else (DEMO_NOTES[0], DEMO_NOTES[2])
    return replace(config, notes=notes, **overrides)
