r"""Accelerator check: one table of what this host's devices do with our models, precisions and search.

    python -m experiments.accelerator_check [--tiny] [--output_json outputs/accelerator_check.json]
    attllm-accelerator-check                # the same, installed

Run it whenever a GPU or TPU host is available (one command; built to finish within 10 minutes on one such
host). It prints one table, a ``section | item | values`` line per row:

- ``backend``: the JAX backend, device kind and count;
- ``parity <model>``: float32 descriptors on the default device against the same model on the CPU (cosine min,
  max abs difference), for one model of every family of ``--random_model`` (released architectures with
  NumPy-drawn weights N(0, 0.05), 4 street views at a small size, ``--check_image_size``);
- ``precision <model>``: tf32 and bfloat16 descriptors against float32 on the device (cosine min) and images/s
  of each precision;
- ``search``: ``jax_exact_search`` against faiss Flat on ``--check_search_rows`` x 512 random unit rows and
  1,000 queries: agreement of the top-10 (fraction of equal indices) and queries/s of each;
- ``bench_models <model>``: images/s of our float32 and bfloat16 and of PyTorch float32 on the CPU at batch
  ``--check_bench_batch`` (:func:`benchmarks.bench_models.bench_model`, 2 timed calls);
- ``extraction``: host decode + preprocess images/s (all cores) against the model's images/s (CosPlace ResNet-18
  at 288 px): the lower one bounds the extraction on this host.

``--tiny`` shrinks every size (2 images of 126 px, one timed call, 20,000 search rows, batch 2, one bench model)
so that the whole table runs on a CPU in a test; the numbers then say nothing about an accelerator.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from absl import flags

from experiments import cli, flagdefs

flags.DEFINE_bool("tiny", False, "Tiny sizes for a CPU test (every row still printed).")
flags.DEFINE_string("output_json", None, "Optional JSON file for the table's rows.")
flags.DEFINE_integer("check_image_size", 224, "Side of the square images of the parity and precision rows.")
flags.DEFINE_integer("check_search_rows", 1_000_000, "Database rows of the search row (512-d).")
flags.DEFINE_integer("check_bench_batch", 32, "Batch size of the bench_models rows.")
flags.DEFINE_list("check_bench_models", ["cosplace", "salad", "megaloc"], "bench_models rows (its --models names).")
FLAGS = flags.FLAGS

FAMILY_MODELS = ("cosplace", "megaloc", "boq_dinov2", "boq_resnet50", "mixvpr", "netvlad", "supervlad", "image4vpr")
PARITY_IMAGES = 4
TIMED_CALLS = 3  # median of; 1 under --tiny
SEARCH_QUERIES, SEARCH_K = 1000, 10


def _row(section: str, item: str, **values) -> dict:
    """One table row, printed at once (a row that fails prints its error instead of values)."""
    text = ", ".join(f"{k} {_fmt(v)}" for k, v in values.items())
    print(f"{section:<11} | {item:<13} | {text}", flush=True)
    return {"section": section, "item": item, **values}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def _median_s(fn: Callable[[], object], repeats: int | None = None) -> float:
    fn()  # compile
    times = []
    for _ in range(TIMED_CALLS if repeats is None else min(repeats, TIMED_CALLS)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cosine_min(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.min(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)))


def drawn_model(name: str, seed: int = 0):
    """The random model ``name``'s released architecture with NumPy-drawn weights (no per-shape init compiles):
    N(0, 0.05) per leaf, +1 for norm scales and BatchNorm variances, 0.5 + N(0, 0.05) for layer-scale gammas."""
    import jax
    from flax import nnx

    from attllm_jax.evaluation.demo import random_model_spec
    from attllm_jax.models.vpr import VPRModel

    spec = random_model_spec(name, seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: spec.build(nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        key = jax.tree_util.keystr(path)
        value = 0.05 * rng.standard_normal(leaf.shape, dtype=np.float32)
        if "var" in key or "scale" in key:
            value += 1.0
        elif "gamma" in key:
            value += 0.5
        elif key.endswith("['p']"):
            value = np.full(leaf.shape, 3.0, np.float32)
        return jax.device_put(value.astype(leaf.dtype))

    return VPRModel(nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state)), spec)


def _images(model, size: int) -> np.ndarray:
    """``[PARITY_IMAGES, H, W, 3]`` street views at ``size`` x ``size`` (MixVPR at its own fixed size)."""
    from benchmarks.bench_models import street_images

    fixed = model.spec.preprocess.size if model.spec.family == "mixvpr" else None
    height, width = fixed if fixed else (size, size)
    return street_images(PARITY_IMAGES, height, width, FLAGS.cache_dir)


def model_rows(name: str, size: int) -> list[dict]:
    """The parity row (device vs CPU float32) and the precision row (tf32, bfloat16 vs float32) of one model."""
    import jax
    from jax.sharding import Mesh

    from attllm_jax.models.vpr import VPRModel

    model = drawn_model(name)
    images = _images(model, size)
    on_device = np.asarray(model(images))
    cpu = jax.devices("cpu")[0]
    reference = VPRModel(model.net, model.spec, "float32")
    reference.replicate(Mesh(np.array([cpu]), ("data",)))
    on_cpu = np.asarray(reference(jax.device_put(images, cpu)))
    parity = _row(
        "parity", name, cos_min=_cosine_min(on_device, on_cpu), max_abs=float(np.abs(on_device - on_cpu).max())
    )
    rates, cosines = {}, {}
    x = jax.device_put(images)
    for precision in ("float32", "tf32", "bfloat16"):
        variant = model if precision == "float32" else VPRModel(model.net, model.spec, precision)
        rates[precision] = len(images) / _median_s(lambda v=variant: v(x).block_until_ready())
        if precision != "float32":
            cosines[precision] = _cosine_min(np.asarray(variant(x)), on_device)
    precision_row = _row(
        "precision",
        name,
        cos_tf32=cosines["tf32"],
        cos_bf16=cosines["bfloat16"],
        ips_f32=rates["float32"],
        ips_tf32=rates["tf32"],
        ips_bf16=rates["bfloat16"],
    )
    return [parity, precision_row]


def search_row(rows: int) -> dict:
    """``jax_exact_search`` on the devices against faiss Flat on the CPU: agreement and queries/s."""
    from attllm_jax.retrieval.index import build_faiss_index
    from attllm_jax.retrieval.jax_search import ShardedExactIndex

    rng = np.random.default_rng(0)
    database = np.empty((rows, 512), np.float32)
    for start in range(0, rows, 65536):
        part = rng.standard_normal((min(65536, rows - start), 512), dtype=np.float32)
        database[start : start + len(part)] = part / np.linalg.norm(part, axis=1, keepdims=True)
    queries = database[rng.choice(rows, SEARCH_QUERIES, replace=False)] + 0.05 * rng.standard_normal(
        (SEARCH_QUERIES, 512), dtype=np.float32
    )
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = ShardedExactIndex(database)
    found = {}
    jax_s = _median_s(lambda: found.update(jax=index.search(queries, SEARCH_K)[1]), repeats=2)
    flat = build_faiss_index("faiss_flat", database)
    faiss_s = _median_s(lambda: found.update(faiss=flat.search(queries, SEARCH_K)[1]), repeats=1)
    return _row(
        "search",
        f"{rows}x512",
        agreement=float(np.mean(found["jax"] == found["faiss"])),
        qps_jax=SEARCH_QUERIES / jax_s,
        qps_faiss=SEARCH_QUERIES / faiss_s,
    )


def bench_rows(names: list[str], batch: int) -> list[dict]:
    """bench_models rows: images/s of our float32 / bfloat16 and PyTorch float32 (CPU) at ``batch``."""
    from benchmarks.bench_models import bench_model
    from benchmarks.torch_env import declare_missing_torchvision_ops

    declare_missing_torchvision_ops()
    out = []
    for name in names:
        result = bench_model(name, ["float32", "bfloat16"], batch, 1, 2, 0, False)
        v = result["variants"]
        out.append(
            _row(
                "bench",
                name,
                batch=batch,
                ips_f32=v["ours float32"]["images_per_s"],
                ips_bf16=v["ours bfloat16"]["images_per_s"],
                ips_torch_cpu=v["torch float32"]["images_per_s"],
                cos_bf16=v["ours bfloat16"]["cosine_vs_float32_min"],
            )
        )
    return out


def extraction_row(num_images: int, batch: int) -> dict:
    """Host decode + preprocess images/s (all cores) against the model's images/s: which one bounds extraction."""
    import jax

    from attllm_jax.data.dataset import load_image_set
    from attllm_jax.data.loading import load_batches
    from attllm_jax.data.synthetic import generate_benchmark
    from attllm_jax.evaluation import random_cosplace_model

    database = load_image_set(generate_benchmark(FLAGS.cache_dir).database)
    paths = [(i, str(database.absolute(i % len(database)))) for i in range(num_images)]
    model = random_cosplace_model(seed=0)

    def decode():
        for _ in load_batches(iter(paths), lambda im: model.preprocess(im, 288), batch, print,
                              num_workers=os.cpu_count()):  # fmt: skip
            pass

    host = num_images / _median_s(decode, repeats=1)
    pixels = np.stack([model.preprocess(_open(p), 288) for _, p in paths[:batch]])
    x = jax.device_put(pixels)
    device = batch / _median_s(lambda: model(x).block_until_ready())
    bound = "host decode" if host < device else "model"
    return _row("extraction", "cosplace r18", host_ips=host, model_ips=device, bound=bound)


def _open(path: str):
    from PIL import Image

    return Image.open(path).convert("RGB")


def _guarded(section: str, item: str, fn: Callable[[], list[dict] | dict]) -> list[dict]:
    """``fn``'s rows, or one row naming the error (the table goes on)."""
    try:
        rows = fn()
    except Exception as error:  # noqa: BLE001 - a check that fails is reported, not fatal
        return [_row(section, item, error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}")]
    return rows if isinstance(rows, list) else [rows]


def main(argv: list[str]) -> int:
    del argv
    if _BENCHMARKS_MISSING:
        cli.fail(
            "accelerator_check",
            "it needs the repository's benchmarks/ folder (street images, bench_models and the PyTorch references), "
            "which the wheel does not install: run `python -m experiments.accelerator_check` from a checkout",
        )
    import jax

    global PARITY_IMAGES, TIMED_CALLS
    tiny = FLAGS.tiny
    if tiny:
        PARITY_IMAGES, TIMED_CALLS = 2, 1
    size = 126 if tiny else FLAGS.check_image_size  # 126 px: 81 ViT tokens, more than MegaLoc's 64 clusters
    search_rows = 20_000 if tiny else FLAGS.check_search_rows
    bench_batch, bench_models = (2, ["cosplace"]) if tiny else (FLAGS.check_bench_batch, FLAGS.check_bench_models)
    start = time.perf_counter()
    devices = jax.devices()
    rows = [_row("backend", jax.default_backend(), device=devices[0].device_kind, count=len(devices))]
    for name in FAMILY_MODELS:
        rows += _guarded("parity", name, lambda name=name: model_rows(name, size))
    rows += _guarded("search", f"{search_rows}x512", lambda: search_row(search_rows))
    rows += _guarded("bench", ",".join(bench_models), lambda: bench_rows(bench_models, bench_batch))
    rows += _guarded("extraction", "cosplace r18", lambda: extraction_row(16 if tiny else 256, 4 if tiny else 32))
    print(f"accelerator check done in {time.perf_counter() - start:.0f} s", flush=True)
    if FLAGS.output_json:
        Path(FLAGS.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.output_json).write_text(json.dumps({"jax": jax.__version__, "rows": rows}, indent=1))
    return 1 if any("error" in r for r in rows) else 0


_BENCHMARKS_MISSING = False


def run(argv: list[str] | None = None) -> None:
    """Console-script entry point (``attllm-accelerator-check``, also ``python -m experiments.accelerator_check``)."""
    global _BENCHMARKS_MISSING
    try:
        import benchmarks.bench_models  # noqa: F401 - defines --cache_dir and the flags bench_model reads
    except ModuleNotFoundError as error:
        if error.name != "benchmarks":
            raise
        _BENCHMARKS_MISSING = True  # an installed copy outside a checkout: --help works, a run says why not
        flagdefs.define("cache_dir")
    cli.run_command("accelerator_check", main, cli.module_help(__doc__, __name__), argv)


if __name__ == "__main__":
    run()
