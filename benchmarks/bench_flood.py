r"""Benchmark: procedural flooding throughput, and the severity sweep against one eval run per (level, alpha).

    python -m benchmarks.bench_flood [--num_images 8] [--levels 0.3,0.6] [--alphas 0,0.25,0.5,0.75,1]

1. Flooding, on one thread (images/s per core), at 640x480 and 1024x768: ``flood_pixels`` alone (array in, array
   out), and the whole file step of ``flood_folder`` (decode the JPEG, flood, encode the JPEG and the mask PNG),
   against the reference measured in the same run: decoding and re-encoding the same JPEGs without flooding (the
   I/O floor a flood cannot go below).
2. Severity, on a small synthetic street set (random-weight CosPlace ResNet-18/512, mask attention): one
   ``run_severity`` over L levels x K alphas (one database store; every level one eval over the alpha grid) against
   running ``run_evaluation`` once per (level, alpha) pair with a single alpha, as a user without the sweep would,
   (a) with a fresh output folder each time (the database re-extracted every run) and (b) sharing one
   ``--store_dir``. The same loaded model serves every run; the flooded queries and mask attention are made once
   beforehand for the references. Wall-clock seconds, compilation included.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import flagdefs

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 8, "Images per size for the flooding throughput.")
flags.DEFINE_list("levels", ["0.3", "0.6"], "Flooded levels of the severity comparison (level 0 is added).")
flags.DEFINE_list("alphas", ["0", "0.25", "0.5", "0.75", "1"], "Alphas of the severity comparison.")
flags.DEFINE_integer("num_queries", 12, "Synthetic queries of the severity comparison.")
flags.DEFINE_string("output_json", None, "Optional path for the numbers as JSON.")
flagdefs.define("precision")

SIZES = ((480, 640), (768, 1024))


def _photos(height: int, width: int, count: int) -> list[np.ndarray]:
    """Street-like test photos: synthetic facade views rendered at the requested size."""
    from attllm_jax.data import synthetic

    rng = np.random.default_rng(0)
    strip = synthetic._facade_strip(rng, 120.0)
    return [
        (synthetic._render_view(strip, 10.0 + 9.0 * k, 1.0, height, width) * 255 + 0.5).astype(np.uint8)
        for k in range(count)
    ]


def _jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_flooding(num_images: int) -> list[dict]:
    from PIL import Image

    from attllm_jax.data.flood import encode_mask, flood_pixels

    rows = []
    for height, width in SIZES:
        photos = _photos(height, width, num_images)
        files = [_jpeg(p) for p in photos]

        def decode(data: bytes) -> np.ndarray:
            with Image.open(io.BytesIO(data)) as image:
                return np.asarray(image.convert("RGB"))

        def io_floor(files=files):
            for data in files:
                _jpeg(decode(data))

        def pixels_only(photos=photos):
            for k, p in enumerate(photos):
                flood_pixels(p, 0.3 + 0.05 * (k % 4), seed=0)

        def file_step(files=files):
            for k, data in enumerate(files):
                out, mask = flood_pixels(decode(data), 0.3 + 0.05 * (k % 4), seed=0)
                _jpeg(out)
                encode_mask(mask)

        t_io, t_px, t_file = _best_of(io_floor), _best_of(pixels_only), _best_of(file_step)
        rows.append(
            {
                "size": f"{width}x{height}",
                "io_floor_images_per_s": num_images / t_io,
                "flood_pixels_images_per_s": num_images / t_px,
                "flood_file_images_per_s": num_images / t_file,
                "file_step_over_io_floor": t_file / t_io,
            }
        )
    return rows


def bench_severity(levels: list[float], alphas: list[float], num_queries: int) -> dict:
    from attllm_jax.data.flood import level_name
    from attllm_jax.data.synthetic import SyntheticConfig
    from attllm_jax.evaluation import random_cosplace_model, run_evaluation
    from attllm_jax.evaluation.severity import run_severity, synthetic_severity_config

    small = SyntheticConfig(
        num_streets=2, street_length_m=150.0, num_queries=num_queries, flood_min=0.0, flood_max=0.0, seed=7
    )
    model = random_cosplace_model(0, precision=FLAGS.precision)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = synthetic_severity_config(root / "cache", root / "sweep", synthetic=small)
        config = replace(
            config, eval=replace(config.eval, alphas=tuple(alphas)), levels=tuple(levels), bootstrap=200
        ).validated()
        run_evaluation(replace(config.eval, output_dir=str(root / "warm"), alphas=(0.0,)), model=model)  # compile
        t0 = time.perf_counter()
        severity = run_severity(config, model=model)
        t_sweep = time.perf_counter() - t0
        sweep_out = Path(config.eval.output_dir)
        pairs = [(v, a) for v in config.levels for a in config.eval.alphas]

        def per_pair(shared_store: bool) -> tuple[float, dict]:
            t0 = time.perf_counter()
            recalls = {}
            for k, (level, alpha) in enumerate(pairs):
                queries = config.eval.queries_folder if level == 0 else sweep_out / "flooded" / level_name(level)
                attention = None if level == 0 else sweep_out / "attention_masks" / level_name(level)
                out = root / ("shared" if shared_store else "fresh") / f"pair_{k}"
                ev = replace(
                    config.eval,
                    queries_folder=str(queries),
                    attention_dir=None if attention is None else str(attention),
                    alphas=(alpha,),
                    output_dir=str(out),
                    store_dir=str(root / "shared_store") if shared_store else None,
                )
                result = run_evaluation(ev, model=model)
                recalls[(level, alpha)] = result.results["recalls"][str(float(alpha))]["1"]
            return time.perf_counter() - t0, recalls

        t_fresh, recalls_fresh = per_pair(False)
        t_shared, recalls_shared = per_pair(True)
        agree = all(
            severity["recalls"][level_name(v)][str(float(a))]["1"] == recalls_fresh[(v, a)] == recalls_shared[(v, a)]
            for v, a in pairs
        )
    return {
        "levels": list(config.levels),
        "alphas": list(config.eval.alphas),
        "num_database": severity["num_database"],
        "num_queries": num_queries,
        "sweep_s": t_sweep,
        "per_pair_fresh_store_s": t_fresh,
        "per_pair_shared_store_s": t_shared,
        "speedup_vs_fresh": t_fresh / t_sweep,
        "speedup_vs_shared": t_shared / t_sweep,
        "recall_at_1_agrees": agree,
    }


def main(argv):
    del argv
    cores = os.cpu_count()
    flooding = bench_flooding(FLAGS.num_images)
    print(f"procedural flooding, one thread ({cores} cores on this machine), images/s, best of 3:")
    print("| size | decode+encode only (reference) | flood_pixels | decode+flood+encode+mask | file step / reference |")
    print("|---|---|---|---|---|")
    for r in flooding:
        print(
            f"| {r['size']} | {r['io_floor_images_per_s']:.1f} | {r['flood_pixels_images_per_s']:.1f} | "
            f"{r['flood_file_images_per_s']:.1f} | {r['file_step_over_io_floor']:.2f}x |"
        )
    severity = bench_severity([float(v) for v in FLAGS.levels], [float(a) for a in FLAGS.alphas], FLAGS.num_queries)
    n_pairs = len(severity["levels"]) * len(severity["alphas"])
    print(
        f"\nseverity sweep, {len(severity['levels'])} levels x {len(severity['alphas'])} alphas, "
        f"{severity['num_database']} database images, {severity['num_queries']} queries (wall s):"
    )
    print("| case | seconds | sweep speed-up |")
    print("|---|---|---|")
    print(f"| run_severity (one store, one eval per level) | {severity['sweep_s']:.1f} | 1.00x |")
    print(
        f"| {n_pairs} evals, one per (level, alpha), fresh store each | {severity['per_pair_fresh_store_s']:.1f} | "
        f"{severity['speedup_vs_fresh']:.2f}x |"
    )
    print(
        f"| {n_pairs} evals, one per (level, alpha), shared --store_dir | {severity['per_pair_shared_store_s']:.1f} | "
        f"{severity['speedup_vs_shared']:.2f}x |"
    )
    print(f"R@1 of every (level, alpha) identical in all three: {severity['recall_at_1_agrees']}")
    if FLAGS.output_json:
        Path(FLAGS.output_json).write_text(json.dumps({"flooding": flooding, "severity": severity}, indent=2))


if __name__ == "__main__":
    app.run(main)
