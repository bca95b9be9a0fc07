r"""Benchmark: where the database extraction's time goes, on 1 and 8 virtual CPU devices.

    python -m benchmarks.bench_extract [--num_images 64] [--image_size 288] [--batch_size 8] [--devices 1,8] \
        [--repeats 3] [--output_json outputs/bench_extract.json]

On the demo's synthetic database (generated under --cache_dir; 384 x 288 JPEGs) with the random-weight CosPlace
ResNet-18/512, it measures images/s of:

- the host pipeline alone: JPEG decode + ``model.preprocess`` through ``load_batches`` (no model), with one
  decode thread (the rate per core) and with --num_workers threads;
- the model alone: ``features`` + ``aggregate`` of one preprocessed batch on the ``data`` mesh, after compiling;
- the whole extraction: ``build_database_store`` into a temporary store (decode threads overlapping the model).

Each device count runs in its own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (JAX fixes
the device count when it starts). Virtual devices share the same CPU cores, so 8 of them measure the sharding's
overhead, not a speed-up. The run says which part bounds the extraction: the lower of the host rate (all threads)
and the model rate; ``whole / min(host, model)`` is how well decode and compute overlap. Timings are the best of
--repeats (the machine may be shared by other jobs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from absl import app, flags

from experiments import flagdefs

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_images", 64, "Database images used (the first ones of the synthetic database).")
flags.DEFINE_integer("image_size", 288, "Shorter side after the resize (288 = the views' own height).")
flags.DEFINE_integer("batch_size", 8, "Images per batch (rounded up to a multiple of the device count).")
flags.DEFINE_integer("num_workers", None, "Decode threads of the multi-threaded host measurement (default: cores).")
flags.DEFINE_list("devices", ["1", "8"], "Virtual CPU device counts (one subprocess each).")
flags.DEFINE_integer("repeats", 3, "Timings are the best of this many runs.")
flagdefs.define("precision")
flagdefs.define("cache_dir")
flags.DEFINE_string("output_json", "outputs/bench_extract.json", "Where the numbers are written.")
flags.DEFINE_integer("child_devices", None, "Internal: run the device measurements in this process.")
flags.DEFINE_string("child_output", None, "Internal: where the child writes its JSON.")


def _database(num_images: int):
    from attllm_jax.data.dataset import load_image_set
    from attllm_jax.evaluation.demo import prepare_demo

    benchmark, _ = prepare_demo(FLAGS.cache_dir)
    images = load_image_set(benchmark.database)
    n = min(num_images, len(images))
    return replace(images, paths=images.paths[:n], locations=images.locations[:n])


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def host_rate(images, model, num_workers: int) -> float:
    """Images/s of decode + preprocess through the batching pipeline, no model."""
    from attllm_jax.data.loading import load_batches

    def run():
        items = ((i, str(images.absolute(i))) for i in range(len(images)))
        for _ in load_batches(items, lambda im: model.preprocess(im, image_size=FLAGS.image_size), 8, print,
                              num_workers=num_workers):  # fmt: skip
            pass

    return len(images) / _best(run, FLAGS.repeats)


def child(devices: int, output: str) -> None:
    """Model-alone and whole-extraction rates on this process's devices."""
    import jax
    import numpy as np
    from PIL import Image

    from attllm_jax.evaluation import random_cosplace_model
    from attllm_jax.evaluation.extract import build_database_store, data_sharding, device_batch_size

    assert jax.device_count() == devices, jax.devices()
    images = _database(FLAGS.num_images)
    model = random_cosplace_model(seed=0, precision=FLAGS.precision)
    batch = device_batch_size(FLAGS.batch_size)
    pixels = np.stack(
        [model.preprocess(Image.open(images.absolute(i % len(images))), FLAGS.image_size) for i in range(batch)]
    )
    sharding = data_sharding()
    model.replicate(sharding.mesh)
    x = jax.device_put(pixels, sharding)
    forward = lambda: model.aggregate(model.features(x)).block_until_ready()  # noqa: E731
    forward()  # compile
    steps = max(1, 2 * FLAGS.num_images // batch)
    model_s = _best(lambda: [forward() for _ in range(steps)], FLAGS.repeats) / steps
    whole = []
    for _ in range(FLAGS.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            store, summary = build_database_store(
                model, images, Path(tmp) / "store", chunk_size=len(images), batch_size=batch,
                image_size=FLAGS.image_size, num_workers=FLAGS.num_workers,
            )  # fmt: skip
            store.close()
            whole.append(summary.images_computed / summary.seconds)
    result = {"devices": devices, "batch": batch, "model_images_per_s": batch / model_s}
    result["whole_images_per_s"] = max(whole)
    Path(output).write_text(json.dumps(result))


def main(argv):
    del argv
    if FLAGS.child_devices is not None:
        child(FLAGS.child_devices, FLAGS.child_output)
        return
    from attllm_jax.data.loading import default_num_workers
    from attllm_jax.evaluation import random_cosplace_model
    from attllm_jax.files import atomic_write_json

    images = _database(FLAGS.num_images)
    model = random_cosplace_model(seed=0, precision=FLAGS.precision)
    workers = FLAGS.num_workers or default_num_workers()
    result = {
        "num_images": len(images),
        "image_size": FLAGS.image_size,
        "precision": FLAGS.precision,
        "cpu_count": os.cpu_count(),
        "host_images_per_s_1_thread": host_rate(images, model, 1),
        "host_threads": workers,
        "host_images_per_s": host_rate(images, model, workers),
        "devices": [],
    }
    print(
        f"host pipeline (decode + preprocess to {FLAGS.image_size} px): "
        f"{result['host_images_per_s_1_thread']:.1f} images/s on 1 thread, "
        f"{result['host_images_per_s']:.1f} on {workers} threads ({os.cpu_count()} cores)"
    )
    for devices in (int(d) for d in FLAGS.devices):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "child.json"
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
            env.setdefault("JAX_PLATFORMS", "cpu")
            args = [sys.executable, "-m", "benchmarks.bench_extract", f"--child_devices={devices}",
                    f"--child_output={out}", *sys.argv[1:]]  # fmt: skip
            subprocess.run(args, env=env, check=True, timeout=3600)
            row = json.loads(out.read_text())
        host, model_rate, whole = result["host_images_per_s"], row["model_images_per_s"], row["whole_images_per_s"]
        row["bound"] = "host pipeline" if host < model_rate else "model"
        row["whole_vs_bound"] = whole / min(host, model_rate)
        result["devices"].append(row)
        print(
            f"{devices} device(s), batches of {row['batch']}: model alone {model_rate:.1f} images/s, whole extraction "
            f"{whole:.1f} images/s = {row['whole_vs_bound']:.2f} x the bound ({row['bound']})"
        )
    path = Path(FLAGS.output_json)
    atomic_write_json(path, result)
    print(f"written to {path}")


if __name__ == "__main__":
    app.run(main)
