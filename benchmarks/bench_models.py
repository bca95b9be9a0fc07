"""Images/s of our jitted models at each precision vs the PyTorch originals (eager, ``torch.inference_mode``, float32
and bfloat16 autocast) on the same machine, inputs and run, with achieved GFLOP/s against a matmul peak measured in
the same run.

    python -m benchmarks.bench_models                                   # every model, float32, B=8
    python -m benchmarks.bench_models --precision float32,bfloat16      # issue 12's table
    python -m benchmarks.bench_models --models=cosplace,salad --batch_size=4 --repeats=2 --output=bench.json

Models (``--models`` selects rows), with seeded random weights (the published checkpoints are not needed; every
model goes through the production converter):

- ``cosplace``: CosPlace ResNet-50 (torchvision trunk + GeM head, 2048-D) at 512x683;
- ``salad``: DINOv2 ViT-B/14 + SALAD (transformers' DINOv2 with upstream's interpolation as the PyTorch model) at
  322x322;
- ``megaloc`` (322x322) and ``megaloc_photo`` (a 480x640 photo, which both models resize to 476x644 themselves):
  MegaLoc against :class:`benchmarks.torch_zoo.TorchMegaLoc`;
- ``boq_dinov2`` (322x322) and ``boq_resnet50`` (384x384): BoQ against :class:`benchmarks.torch_zoo.TorchBoQ`
  (torch's own ``TransformerEncoderLayer`` / ``MultiheadAttention``);
- ``mixvpr`` (320x320, the size the network resizes to): MixVPR 4096-d against
  :class:`benchmarks.torch_mixvpr.TorchMixVPR`;
- ``netvlad`` (a 480x640 photo, evaluated at its own size): NetVLAD 4096-d against
  :class:`benchmarks.torch_netvlad.TorchNetVLAD`, both loaded from the same random ``*_struct.mat`` file;
- ``supervlad`` and ``image4vpr`` (322x322): SuperVLAD and ImAge against the test references
  ``tests/torch_supervlad.py`` / ``tests/torch_image4vpr.py`` (transformers' DINOv2; run from the repository root).

Inputs are database views of the demo's synthetic benchmark resized to the model's size (photo-like, so the
descriptor cosines between precisions mean something; not real photos). For every variant the table gives seconds
per call (median over ``--repeats`` after ``--warmup``; the calls alternate between all variants so that they see
the same background load), images/s, achieved GFLOP/s (matrix-product and convolution FLOPs counted on our float32
jaxpr, the same count for every variant) and its share of the matmul peak of its dtype (a 2048^3 product in XLA or
PyTorch, measured at the start of the run), the speed-up against PyTorch float32 and against our float32, and the
descriptor cosine (min, median over the batch) against our float32.

CPU findings for issue 12 (the 2-core development VM, AMD EPYC with AVX512-BF16, jax 0.10.2, loaded by other jobs:
load average 2.7-9 on 2 cores, so absolute times move by 2x between runs; ratios are from one run; the table is in
the README):

- bfloat16 x bfloat16 -> float32 products run at ~2x float32 in XLA:CPU (2048^3: 455-589 vs 220-327 GFLOP/s), but
  bfloat16 -> bfloat16 products below float32 (74 vs 104 for ViT-B's fc1), 1x1 convolutions at a quarter of the
  product's speed in either dtype and 3x3 convolutions no faster in bfloat16 (82-102 vs 88-112 GFLOP/s for a
  3x3x256x256 convolution under every XLA flag tried: default, ``--xla_cpu_use_thunk_runtime=false``,
  ``--xla_cpu_enable_fast_math=true``, ``--xla_cpu_use_onednn=true``,
  ``--xla_cpu_experimental_onednn_custom_call=true``, ``--xla_cpu_use_xnnpack=true``,
  ``--xla_cpu_experimental_xnn_fusion_type=dot,eltwise``, ``--xla_cpu_experimental_ynn_fusion_type=dot``,
  ``--xla_cpu_experimental_onednn_fusion_type=dot``; ``--xla_cpu_use_mkl_dnn`` is not a flag of this jaxlib).
- Hence the bfloat16 precision asks every backbone layer for float32 results and runs 1x1 convolutions as products
  (``attllm_jax.models.precision``): bfloat16 / our float32 = 1.43x for CosPlace ResNet-50 at 512x683 (the 3x3
  convolutions cap it below the 1.5x target), 1.65x for SALAD ViT-B/14 at 322x322. float32 stays the CPU default.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

from absl import app, flags, logging

from attllm_jax.models.precision import PRECISIONS
from experiments import flagdefs

MODELS = (
    "cosplace",
    "salad",
    "megaloc",
    "megaloc_photo",
    "boq_dinov2",
    "boq_resnet50",
    "mixvpr",
    "netvlad",
    "supervlad",
    "image4vpr",
)

flags.DEFINE_list("models", list(MODELS), f"Models to benchmark: {', '.join(MODELS)}.")
flags.DEFINE_integer("batch_size", 8, "Images per call.", lower_bound=1)
flags.DEFINE_integer("warmup", 1, "Untimed calls before timing (the first JAX call compiles).", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed calls; the median is reported.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")
flags.DEFINE_list("precision", ["float32"], f"Our precisions to time: {', '.join(PRECISIONS)} (comma-separated).")
flags.DEFINE_bool("torch_bf16", True, "Also time PyTorch under torch.autocast('cpu', dtype=torch.bfloat16).")
flags.DEFINE_integer(
    "peak_size", 2048, "Side of the square matmul whose GFLOP/s is reported as the peak.", lower_bound=64
)
flagdefs.define("cache_dir")
FLAGS = flags.FLAGS


@flags.validator("models", message=f"--models must be a non-empty subset of {MODELS}")
def _check_models(value: list[str]) -> bool:
    return bool(value) and all(v in MODELS for v in value)


@flags.validator("precision", message="--precision must list float32, tf32 and/or bfloat16")
def _check_precision(value: list[str]) -> bool:
    return bool(value) and all(v in PRECISIONS for v in value) and len(set(value)) == len(value)


def _time_interleaved(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> tuple[dict, dict]:
    """Seconds of each function's first call, then of each timed call, alternating between the functions so that
    all of them see the same machine load. Returns ``(first_call_s, times_s)``, both keyed like ``fns``."""
    first = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
        for _ in range(warmup - 1):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return first, times


def matmul_flops(fn: Callable, *args) -> float:
    """Floating-point operations of the matrix products and convolutions of ``fn(*args)`` (2 per multiply-add).

    Counted on the jaxpr (``jax.make_jaxpr``), loops multiplied by their trip count; XLA's own cost analysis counts
    a loop body once, and our CPU code loops over images and attention groups.
    """
    import jax
    import numpy as np

    def subjaxprs(params):
        for value in params.values():
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(item, "eqns"):
                    yield getattr(item, "jaxpr", item)  # ClosedJaxpr or Jaxpr

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contract])
            elif name == "conv_general_dilated":
                rhs = eqn.invars[1].aval.shape
                spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
                total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([rhs[d] for d in spec[1:]])
            trips = eqn.params.get("length", 1) if name == "scan" else 1
            total += trips * sum(count(sub) for sub in subjaxprs(eqn.params))
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def matmul_peaks(size: int) -> dict[str, float]:
    """GFLOP/s of one ``[size, size] x [size, size]`` product: XLA float32 (highest) and bfloat16, PyTorch float32
    and bfloat16 (best of 5 after a warm-up, measured in this run)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    a = np.random.default_rng(0).normal(size=(size, size)).astype(np.float32)
    flops = 2.0 * size**3

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return flops / min(times) / 1e9

    out = {}
    for dtype, precision in ((jnp.float32, "highest"), (jnp.bfloat16, "default")):
        x = jax.device_put(a.astype(dtype))
        with jax.default_matmul_precision(precision):
            product = jax.jit(lambda p: jnp.matmul(p, p, preferred_element_type=jnp.float32))
            out[f"jax_{jnp.dtype(dtype).name}"] = best(lambda x=x, product=product: product(x).block_until_ready())
    for dtype in (torch.float32, torch.bfloat16):
        t = torch.from_numpy(a).to(dtype)
        with torch.inference_mode():
            out[f"torch_{str(dtype).split('.')[-1]}"] = best(lambda t=t: t @ t)
    return out


def street_images(batch_size: int, height: int, width: int, cache_dir: str):
    """``[B, H, W, 3]`` ImageNet-normalized database views of the demo's synthetic benchmark (generated once into
    ``cache_dir``), resized bilinearly to ``H x W``: photo-like inputs, so the precision cosines mean something."""
    import numpy as np
    from PIL import Image

    from attllm_jax.data.preprocess import IMAGENET_MEAN, IMAGENET_STD
    from attllm_jax.data.synthetic import generate_benchmark

    paths = sorted(generate_benchmark(cache_dir).database.glob("*.jpg"))
    out = []
    for i in range(batch_size):
        image = Image.open(paths[(7 * i) % len(paths)]).convert("RGB").resize((width, height), Image.BILINEAR)
        out.append((np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD)
    return np.stack(out).astype(np.float32)


def _cosplace_pair(seed: int):
    """(torch model, our VPRModel, image size) for CosPlace ResNet-50 / 2048."""
    import torch

    from attllm_jax.convert import convert
    from attllm_jax.convert.cosplace import CnnConvertOptions
    from attllm_jax.models.vpr import VPRModel
    from benchmarks.torch_baselines import TorchCosPlace, randomize_batchnorm_stats_

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference = randomize_batchnorm_stats_(TorchCosPlace("ResNet50", 2048, gem_p=3.0), generator).eval()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    net, spec = convert("cosplace", state, CnnConvertOptions("ResNet50", 2048))
    return reference, VPRModel(net, spec), (512, 683)


def _salad_pair(seed: int):
    """(torch model, our VPRModel, image size) for DINOv2 ViT-B/14 + SALAD."""
    import torch

    from attllm_jax.convert import convert
    from attllm_jax.convert.salad import SaladConvertOptions
    from attllm_jax.models.vpr import VPRModel
    from benchmarks.torch_baselines import RELEASED_SALAD_ARCH, make_torch_dino_salad

    reference = make_torch_dino_salad(torch.Generator().manual_seed(seed), **RELEASED_SALAD_ARCH)
    state = {k: v.numpy() for k, v in reference.upstream_state_dict().items()}
    net, spec = convert("salad", state, SaladConvertOptions(backbone="dinov2_vitb14"))
    return reference, VPRModel(net, spec), (322, 322)


def _megaloc_pair(seed: int, size: tuple[int, int]):
    """(torch model, our VPRModel, image size) for MegaLoc (ViT-B/14, SALAD 64 x 256 + 256, linear to 8448)."""
    import torch

    from attllm_jax.convert import convert
    from attllm_jax.convert.megaloc import MegaLocConvertOptions
    from attllm_jax.models.vpr import VPRModel
    from benchmarks.torch_zoo import RELEASED_MEGALOC_ARCH, make_torch_megaloc

    reference = make_torch_megaloc(torch.Generator().manual_seed(seed), **RELEASED_MEGALOC_ARCH)
    state = {k: v.numpy() for k, v in reference.upstream_state_dict().items()}
    net, spec = convert("megaloc", state, MegaLocConvertOptions(backbone="dinov2_vitb14"))
    return reference, VPRModel(net, spec), size


def _boq_pair(seed: int, backbone: str):
    """(torch model, our VPRModel, image size) for BoQ with the released DINOv2 or ResNet-50 architecture."""
    import torch

    from attllm_jax.convert import convert
    from attllm_jax.models.vpr import VPRModel
    from benchmarks.torch_zoo import RELEASED_BOQ_ARCH, make_torch_boq

    reference = make_torch_boq(torch.Generator().manual_seed(seed), **RELEASED_BOQ_ARCH[backbone])
    state = {k: v.numpy() for k, v in reference.upstream_state_dict().items()}
    net, spec = convert("boq", state)
    return reference, VPRModel(net, spec), spec.preprocess.size


def _mixvpr_pair(seed: int):
    """(torch model, our VPRModel, image size) for the released 4096-d MixVPR architecture."""
    import torch

    from attllm_jax.convert import convert
    from attllm_jax.models.vpr import VPRModel
    from benchmarks.torch_mixvpr import make_torch_mixvpr

    reference = make_torch_mixvpr(torch.Generator().manual_seed(seed))
    net, spec = convert("mixvpr", {k: v.numpy() for k, v in reference.state_dict().items()})
    return reference, VPRModel(net, spec), spec.preprocess.size


def _netvlad_pair(seed: int):
    """(torch model, our VPRModel, image size) for NetVLAD 4096-d, both read from one random struct file."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from attllm_jax.convert import convert_file
    from attllm_jax.models.vpr import VPRModel
    from benchmarks.torch_netvlad import TorchNetVLAD, random_netvlad_weights, write_netvlad_struct

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random_struct.mat"
        write_netvlad_struct(path, random_netvlad_weights(np.random.default_rng(seed)))
        net, spec = convert_file("netvlad", path)
        reference = TorchNetVLAD(path)
    return reference, VPRModel(net, spec), (480, 640)


def _dinozoo_pair(seed: int, family: str):
    """(torch model, our VPRModel, image size) for SuperVLAD (K=4, G=1) or ImAge (8 tokens before block 8)."""
    import os
    import sys

    import torch

    from attllm_jax.convert import convert
    from attllm_jax.models.vpr import VPRModel

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from torch_image4vpr import make_torch_image4vpr
    from torch_supervlad import make_torch_supervlad

    vitb = dict(embed_dim=768, depth=12, num_heads=12, image_size=518)
    g = torch.Generator().manual_seed(seed)
    reference = (
        make_torch_supervlad(g, **vitb)
        if family == "supervlad"
        else make_torch_image4vpr(g, **vitb, num_tokens=8, insertion=8)
    )
    state = {k.removeprefix("module."): v.detach().numpy() for k, v in reference.upstream_state_dict().items()}
    net, spec = convert(family, state)
    return reference, VPRModel(net, spec), spec.preprocess.size


_PAIRS = {
    "cosplace": _cosplace_pair,
    "salad": _salad_pair,
    "megaloc": lambda seed: _megaloc_pair(seed, (322, 322)),
    "megaloc_photo": lambda seed: _megaloc_pair(seed, (480, 640)),
    "boq_dinov2": lambda seed: _boq_pair(seed, "dinov2"),
    "boq_resnet50": lambda seed: _boq_pair(seed, "resnet50"),
    "mixvpr": _mixvpr_pair,
    "netvlad": _netvlad_pair,
    "supervlad": lambda seed: _dinozoo_pair(seed, "supervlad"),
    "image4vpr": lambda seed: _dinozoo_pair(seed, "image4vpr"),
}


def bench_model(
    name: str, precisions: list[str], batch_size: int, warmup: int, repeats: int, seed: int, torch_bf16: bool
) -> dict:
    """Times one model at each of our precisions and in PyTorch (float32, and bfloat16 autocast), on the same
    photo-like inputs; returns a result row (medians, images/s, GFLOP/s, ratios, descriptor agreement)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from attllm_jax.models.vpr import VPRModel

    reference, base, (height, width) = _PAIRS[name](seed)
    images = street_images(batch_size, height, width, FLAGS.cache_dir)
    images_jax = jax.device_put(images)
    images_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    ours = {p: base if p == "float32" else VPRModel(base.net, base.spec, p) for p in precisions}
    fns: dict[str, Callable[[], object]] = {}
    for precision, model in ours.items():
        fns[f"ours {precision}"] = lambda model=model: model(images_jax).block_until_ready()

    def torch_call(autocast: bool):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return reference(images_torch)

    fns["torch float32"] = lambda: torch_call(False)
    if torch_bf16:
        fns["torch bfloat16 autocast"] = lambda: torch_call(True)
    first, times = _time_interleaved(fns, warmup, repeats)
    alpha = jnp.zeros((), jnp.float32)
    flops = matmul_flops(lambda s, x: base._pure_call(s, x, None, alpha), base._state, images_jax)
    outputs = {
        k: np.asarray(fn() if k.startswith("ours") else fn().float().numpy(), np.float64) for k, fn in fns.items()
    }
    anchor = outputs["ours float32"] if "ours float32" in outputs else outputs["torch float32"]
    variants = {}
    for key, times_s in times.items():
        median = statistics.median(times_s)
        out = outputs[key]
        cos = np.sum(out * anchor, -1) / np.linalg.norm(out, axis=-1) / np.linalg.norm(anchor, axis=-1)
        variants[key] = {
            "median_s": median,
            "images_per_s": batch_size / median,
            "gflops_per_s": flops / median / 1e9,
            "first_call_s": first[key],
            "cosine_vs_float32_min": float(cos.min()),
            "cosine_vs_float32_median": float(np.median(cos)),
            "max_abs_error_vs_torch_float32": float(np.max(np.abs(out - outputs["torch float32"]))),
            "times_s": times_s,
        }
    torch_s = variants["torch float32"]["median_s"]
    ours_f32_s = variants.get("ours float32", {}).get("median_s")
    for row in variants.values():
        row["speedup_vs_torch_float32"] = torch_s / row["median_s"]
        row["speedup_vs_ours_float32"] = None if ours_f32_s is None else ours_f32_s / row["median_s"]
    return {
        "model": name,
        "image_size": [height, width],
        "batch_size": batch_size,
        "gflop_per_call": flops / 1e9,
        "variants": variants,
    }


def main(argv: list[str]) -> None:
    del argv
    from benchmarks.torch_env import declare_missing_torchvision_ops

    declare_missing_torchvision_ops()
    import jax
    import torch

    from attllm_jax.models.precision import runtime_summary

    logging.info(
        "flags: %s",
        {k: FLAGS[k].value for k in ("models", "precision", "batch_size", "warmup", "repeats", "seed", "torch_bf16")},
    )
    print(runtime_summary(), flush=True)
    environment = {
        "jax": jax.__version__,
        "torch": torch.__version__,
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }
    peaks = matmul_peaks(FLAGS.peak_size)  # measured again after the models; the higher of the two is the peak
    print(
        f"matmul peak {FLAGS.peak_size}^3 (GFLOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
        + f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    rows = []
    for name in FLAGS.models:
        logging.info("benchmarking %s", name)
        rows.append(
            bench_model(
                name, FLAGS.precision, FLAGS.batch_size, FLAGS.warmup, FLAGS.repeats, FLAGS.seed, FLAGS.torch_bf16
            )
        )
    peaks_after = matmul_peaks(FLAGS.peak_size)
    peaks = {k: max(v, peaks_after[k]) for k, v in peaks.items()}
    print("matmul peak (higher of start and end of the run): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items()))
    print(
        f"{'model':<13} {'size':>9} {'B':>2} {'variant':<24} {'s/call':>7} {'im/s':>6} {'GFLOP/s':>8} {'%peak':>6} "
        f"{'vs torch32':>10} {'vs ours32':>9} {'cos min':>9} {'cos med':>9}"
    )
    for r in rows:
        size = "x".join(str(s) for s in r["image_size"])
        for key, v in r["variants"].items():
            peak = peaks[
                ("jax_" if key.startswith("ours") else "torch_") + ("bfloat16" if "bfloat16" in key else "float32")
            ]
            vs_ours = "" if v["speedup_vs_ours_float32"] is None else f"{v['speedup_vs_ours_float32']:.2f}x"
            print(
                f"{r['model']:<13} {size:>9} {r['batch_size']:>2} {key:<24} {v['median_s']:>7.3f} "
                f"{v['images_per_s']:>6.2f} {v['gflops_per_s']:>8.1f} {100 * v['gflops_per_s'] / peak:>5.0f}% "
                f"{v['speedup_vs_torch_float32']:>9.2f}x {vs_ours:>9} {v['cosine_vs_float32_min']:>9.6f} "
                f"{v['cosine_vs_float32_median']:>9.6f}"
            )
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump({"environment": environment, "matmul_peak_gflops": peaks, "results": rows}, f, indent=2)
        logging.info("wrote %s", FLAGS.output)


if __name__ == "__main__":
    app.run(main)
