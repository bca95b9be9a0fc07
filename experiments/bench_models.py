"""Images/s of our jitted models vs the PyTorch originals (eager, ``torch.inference_mode``) on the same machine.

    python -m experiments.bench_models                      # both models, B=8
    python -m experiments.bench_models --models=salad --repeats=3 --output=bench_models.json

Models, with seeded random weights (the published checkpoints are not needed; the CosPlace weights go through the
production converter, the SALAD weights through ``convert("salad", ...)``):

- ``cosplace``: CosPlace ResNet-50 (torchvision trunk + GeM head, 2048-D) at 512x683;
- ``salad``: DINOv2 ViT-B/14 + SALAD (transformers' DINOv2 with upstream's interpolation as the PyTorch model) at
  322x322;
- ``megaloc`` (322x322) and ``megaloc_photo`` (a 480x640 photo, which both models resize to 476x644 themselves):
  MegaLoc against :class:`experiments.torch_zoo.TorchMegaLoc`;
- ``boq_dinov2`` (322x322) and ``boq_resnet50`` (384x384): BoQ against :class:`experiments.torch_zoo.TorchBoQ`
  (torch's own ``TransformerEncoderLayer`` / ``MultiheadAttention``).

Both run on the same inputs; descriptors are compared (max abs error) so a fast wrong model cannot pass. Each
timing is the median over ``--repeats`` calls after ``--warmup`` calls (our first call compiles); the timed calls
alternate between the two models so that both see the same background load. PyTorch uses its default thread count
(the number of cores), XLA its own pool of the same size. The target of issue 3 is ours >= 1.2x PyTorch on CPU.

Measured on the 2-core development VM (AMD EPYC Zen 3, AVX2; other jobs share the host, so absolute times vary by up
to 2x between runs and the ratios move with them), ``--repeats=3``, B=8:

    cosplace 512x683: 1.20x in a quiet run (torch 7.48 s, ours 6.24 s), 0.81x in a loaded one
    salad    322x322: 0.95x in a quiet run (torch 6.53 s, ours 6.89 s), 0.79-0.93x in loaded ones

SALAD misses the target: ViT-B/14 is matmul-bound (~75% of the AVX2 peak for both frameworks; our dense layers time
the same as PyTorch's) and PyTorch's fused flash-attention kernel beats XLA's unfused attention. Grouping the
attention by (image, head) on CPU (``dinov2.CPU_ATTENTION_CHUNK_BYTES``) gained ~10% at B=8.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable

from absl import app, flags, logging

MODELS = ("cosplace", "salad", "megaloc", "megaloc_photo", "boq_dinov2", "boq_resnet50")

flags.DEFINE_list("models", list(MODELS), f"Models to benchmark: {', '.join(MODELS)}.")
flags.DEFINE_integer("batch_size", 8, "Images per call.", lower_bound=1)
flags.DEFINE_integer("warmup", 1, "Untimed calls before timing (the first JAX call compiles).", lower_bound=1)
flags.DEFINE_integer("repeats", 5, "Timed calls; the median is reported.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed of the random weights and inputs.")
flags.DEFINE_string("output", None, "Optional JSON file for the results.")
FLAGS = flags.FLAGS


@flags.validator("models", message=f"--models must be a non-empty subset of {MODELS}")
def _check_models(value: list[str]) -> bool:
    return bool(value) and all(v in MODELS for v in value)


def _time_interleaved(
    ours: Callable[[], object], theirs: Callable[[], object], warmup: int, repeats: int
) -> tuple[float, list[float], list[float]]:
    """Seconds of our first call, then of each timed call of both, alternating so both see the same machine load."""
    start = time.perf_counter()
    ours()
    first = time.perf_counter() - start
    for _ in range(warmup):
        theirs()
    for _ in range(warmup - 1):
        ours()
    ours_times, theirs_times = [], []
    for _ in range(repeats):
        for fn, times in ((ours, ours_times), (theirs, theirs_times)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return first, ours_times, theirs_times


def _cosplace_pair(seed: int):
    """(torch model, our VPRModel, image size) for CosPlace ResNet-50 / 2048."""
    import torch

    from attllm_jax.convert import convert
    from attllm_jax.models.vpr import VPRModel
    from experiments.torch_baselines import TorchCosPlace, randomize_batchnorm_stats_

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    reference = randomize_batchnorm_stats_(TorchCosPlace("ResNet50", 2048, gem_p=3.0), generator).eval()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    net, spec = convert("cosplace", state, backbone="ResNet50", fc_output_dim=2048)
    return reference, VPRModel(net, spec), (512, 683)


def _salad_pair(seed: int):
    """(torch model, our VPRModel, image size) for DINOv2 ViT-B/14 + SALAD."""
    import torch

    from attllm_jax.convert import convert
    from attllm_jax.models.vpr import VPRModel
    from experiments.torch_baselines import RELEASED_SALAD_ARCH, make_torch_dino_salad

    reference = make_torch_dino_salad(torch.Generator().manual_seed(seed), **RELEASED_SALAD_ARCH)
    state = {k: v.numpy() for k, v in reference.upstream_state_dict().items()}
    net, spec = convert("salad", state, backbone="dinov2_vitb14")
    return reference, VPRModel(net, spec), (322, 322)


def _megaloc_pair(seed: int, size: tuple[int, int]):
    """(torch model, our VPRModel, image size) for MegaLoc (ViT-B/14, SALAD 64 x 256 + 256, linear to 8448)."""
    import torch

    from attllm_jax.convert import convert
    from attllm_jax.models.vpr import VPRModel
    from experiments.torch_zoo import RELEASED_MEGALOC_ARCH, make_torch_megaloc

    reference = make_torch_megaloc(torch.Generator().manual_seed(seed), **RELEASED_MEGALOC_ARCH)
    state = {k: v.numpy() for k, v in reference.upstream_state_dict().items()}
    net, spec = convert("megaloc", state, backbone="dinov2_vitb14")
    return reference, VPRModel(net, spec), size


def _boq_pair(seed: int, backbone: str):
    """(torch model, our VPRModel, image size) for BoQ with the released DINOv2 or ResNet-50 architecture."""
    import torch

    from attllm_jax.convert import convert
    from attllm_jax.models.vpr import VPRModel
    from experiments.torch_zoo import RELEASED_BOQ_ARCH, make_torch_boq

    reference = make_torch_boq(torch.Generator().manual_seed(seed), **RELEASED_BOQ_ARCH[backbone])
    state = {k: v.numpy() for k, v in reference.upstream_state_dict().items()}
    net, spec = convert("boq", state)
    return reference, VPRModel(net, spec), spec.preprocess.size


_PAIRS = {
    "cosplace": _cosplace_pair,
    "salad": _salad_pair,
    "megaloc": lambda seed: _megaloc_pair(seed, (322, 322)),
    "megaloc_photo": lambda seed: _megaloc_pair(seed, (480, 640)),
    "boq_dinov2": lambda seed: _boq_pair(seed, "dinov2"),
    "boq_resnet50": lambda seed: _boq_pair(seed, "resnet50"),
}


def bench_model(name: str, batch_size: int, warmup: int, repeats: int, seed: int) -> dict:
    """Times one model both ways; returns a result row (medians, images/s, ratio, descriptor error)."""
    import jax
    import numpy as np
    import torch

    reference, model, (height, width) = _PAIRS[name](seed)
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(batch_size, height, width, 3)).astype(np.float32)
    images_jax = jax.device_put(images)
    images_torch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    def ours():
        return model(images_jax).block_until_ready()

    def theirs():
        with torch.inference_mode():
            return reference(images_torch)

    compile_s, ours_times, torch_times = _time_interleaved(ours, theirs, warmup, repeats)
    error = float(np.max(np.abs(np.asarray(ours()) - theirs().numpy())))
    ours_s, torch_s = statistics.median(ours_times), statistics.median(torch_times)
    return {
        "model": name,
        "image_size": [height, width],
        "batch_size": batch_size,
        "torch_median_s": torch_s,
        "ours_median_s": ours_s,
        "torch_images_per_s": batch_size / torch_s,
        "ours_images_per_s": batch_size / ours_s,
        "speedup": torch_s / ours_s,
        "ours_first_call_s": compile_s,
        "max_abs_descriptor_error": error,
        "torch_times_s": torch_times,
        "ours_times_s": ours_times,
    }


def main(argv: list[str]) -> None:
    del argv
    from experiments.torch_env import declare_missing_torchvision_ops

    declare_missing_torchvision_ops()
    import jax
    import torch

    logging.info("flags: %s", {k: FLAGS[k].value for k in ("models", "batch_size", "warmup", "repeats", "seed")})
    environment = {
        "jax": jax.__version__,
        "torch": torch.__version__,
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "matmul_precision": str(jax.config.jax_default_matmul_precision),
    }
    rows = []
    for name in FLAGS.models:
        logging.info("benchmarking %s", name)
        rows.append(bench_model(name, FLAGS.batch_size, FLAGS.warmup, FLAGS.repeats, FLAGS.seed))
    print(
        f"{'model':<13} {'size':>9} {'B':>3} {'torch s':>9} {'ours s':>9} {'torch im/s':>11} {'ours im/s':>10} "
        f"{'ratio':>6} {'max err':>9}"
    )
    for r in rows:
        size = "x".join(str(s) for s in r["image_size"])
        print(
            f"{r['model']:<13} {size:>9} {r['batch_size']:>3} {r['torch_median_s']:>9.3f} {r['ours_median_s']:>9.3f} "
            f"{r['torch_images_per_s']:>11.2f} {r['ours_images_per_s']:>10.2f} {r['speedup']:>5.2f}x "
            f"{r['max_abs_descriptor_error']:>9.1e}"
        )
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump({"environment": environment, "results": rows}, f, indent=2)
        logging.info("wrote %s", FLAGS.output)


if __name__ == "__main__":
    app.run(main)
