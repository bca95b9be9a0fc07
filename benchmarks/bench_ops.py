r"""Benchmark the jitted ops against straightforward eager PyTorch: ``python -m benchmarks.bench_ops``.

Times, on the same inputs and in one process, each op of :mod:`attllm_jax.ops` (wrapped in ``jax.jit``, compiled
first, ``block_until_ready``) against an eager PyTorch CPU transcription of the same formulas:

- modulated GeM on ResNet-50 features of a 512x683 image: B=32, [32, 16, 22, 2048] (PyTorch gets NCHW);
- an alpha sweep of 21 values: ours one vmapped call over the alpha grid, PyTorch a loop of 21 calls;
- RBF attention maps: B=256 images, 8 points each, onto a 16x22 grid;
- SALAD pooling: B=32, 23x23 tokens, l=128, m=64, g=256, plain and with attention (alpha=0.5).

Prints a table of medians (op, torch ms, ours ms, torch/ours) and writes it as JSON with ``--output``. On a
loaded 2-core machine PyTorch's default 2 threads contend badly; ``--torch_threads 1`` gives it its best case.
Example:

    python -m benchmarks.bench_ops --repeats 20 --output outputs/bench_ops.json
"""

import json
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from attllm_jax import ops

FLAGS = flags.FLAGS
flags.DEFINE_integer("repeats", 7, "Timed runs per op; the median is reported.", lower_bound=1)
flags.DEFINE_integer("warmup", 1, "Untimed runs per op after the first (compiling) call.", lower_bound=0)
flags.DEFINE_integer("sweep_size", 21, "Number of alphas in the sweep (linspace(0, 1, n)).", lower_bound=2)
flags.DEFINE_integer("torch_threads", None, "torch.set_num_threads (default: PyTorch's choice, all cores).")
flags.DEFINE_string("output", None, "Write the table as JSON to this path.")
flags.DEFINE_integer("seed", 0, "Seed of the random inputs.")

_FLAG_NAMES = ("repeats", "warmup", "sweep_size", "torch_threads", "output", "seed")
EPS = 1e-6
P = 3.0


# --- PyTorch eager transcriptions of docs/DESIGN.md formulas (the baseline) ---------------------------------------


def torch_modulated_gem(torch, x, att, alpha: float):
    """x [B, C, h, w] (PyTorch layout), att [B, h, w] -> [B, C]."""
    xp = x.clamp(min=EPS).pow(P)
    if alpha <= 1e-6:
        return xp.mean(dim=(2, 3)).pow(1.0 / P)
    hw = x.shape[2] * x.shape[3]
    c = (xp.sum(dim=1) / (hw + EPS)).clamp(min=EPS).pow(1.0 / P)
    native = c / (c.mean(dim=(1, 2), keepdim=True) + EPS)
    w = native + alpha * (att.clamp(0.0, 2.0) - native)
    pooled = torch.einsum("bhw,bchw->bc", w, xp) / (w.sum(dim=(1, 2))[:, None] + EPS)
    return pooled.clamp(min=EPS**P).pow(1.0 / P)


def torch_rbf_map(torch, centers, weights, valid, height: int, width: int, sigma: float = 0.2):
    """centers [B, N, 2], weights [B, N], valid [B, N] -> [B, h, w]."""
    centers, weights = centers.clamp(0.0, 1.0), weights.clamp(0.0, 2.0)
    ys, xs = torch.linspace(0, 1, height), torch.linspace(0, 1, width)
    d2 = (xs[None, None, :, None] - centers[:, None, None, :, 0]) ** 2 + (
        ys[None, :, None, None] - centers[:, None, None, :, 1]
    ) ** 2
    logits = (-d2 / (2 * sigma**2)).masked_fill(~valid[:, None, None, :], float("-inf"))
    mixed = (torch.softmax(logits, dim=-1) * weights[:, None, None, :]).sum(-1).clamp(0.0, 2.0)
    return torch.where(valid.any(-1)[:, None, None], mixed, torch.ones_like(mixed))


def torch_salad(torch, f, scores, dustbin: float, g, att=None, alpha: float = 0.0):
    """f [B, N, l], scores [B, m, N], g [B, g], att [B, N] -> [B, g + l*m]."""
    F = torch.nn.functional
    b, m, n = scores.shape
    couplings = torch.cat([scores, torch.full((b, 1, n), dustbin)], dim=1)
    norm = -torch.log(torch.tensor(float(m + n)))
    log_a = torch.cat([norm.expand(m), (torch.log(torch.tensor(float(n - m))) + norm)[None]])
    log_b = norm.expand(n)
    u, v = torch.zeros(b, m + 1), torch.zeros(b, n)
    for _ in range(3):
        u = log_a - torch.logsumexp(couplings + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(couplings + u[:, :, None], dim=1)
    prob = torch.exp(couplings + u[:, :, None] + v[:, None, :] - norm)[:, :m]
    if att is not None and alpha > 1e-6:
        nu = prob.sum(1)
        nu = nu / nu.mean(1, keepdim=True)
        f = f * (nu + alpha * (att.clamp(0.0, 2.0) - nu))[..., None]
    clusters = torch.einsum("bkn,bnl->blk", prob, f)
    local = F.normalize(clusters, dim=1).flatten(1)
    return F.normalize(torch.cat([F.normalize(g, dim=-1), local], dim=-1), dim=-1)


# --- timing --------------------------------------------------------------------------------------------------------


def time_median(fn: Callable[[], object], sync: Callable[[object], object], warmup: int, repeats: int) -> float:
    """Median wall time of ``sync(fn())`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def make_inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The benchmark's inputs: L2-normalized ReLU ResNet-50 features, maps, points and SALAD head outputs."""
    feats = np.maximum(rng.normal(size=(32, 16, 22, 2048)), 0.0).astype(np.float32)
    feats /= np.maximum(np.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
    valid = rng.uniform(size=(256, 8)) < 0.8
    valid[:, 0] = True
    return {
        "x": feats,
        "attention": rng.uniform(0.0, 2.0, size=(32, 16, 22)).astype(np.float32),
        "centers": rng.uniform(0.0, 1.0, size=(256, 8, 2)).astype(np.float32),
        "weights": rng.uniform(0.0, 2.0, size=(256, 8)).astype(np.float32),
        "valid": valid,
        "f": rng.normal(size=(32, 529, 128)).astype(np.float32),
        "scores": rng.normal(size=(32, 64, 529)).astype(np.float32),
        "g": rng.normal(size=(32, 256)).astype(np.float32),
        "token_attention": rng.uniform(0.0, 2.0, size=(32, 529)).astype(np.float32),
    }


def build_cases(torch, data: dict[str, np.ndarray], alphas: np.ndarray) -> list[tuple[str, Callable, Callable]]:
    """(name, torch thunk, jax thunk) per benchmarked op; each pair computes the same thing on the same inputs."""
    t = {k: torch.from_numpy(v) for k, v in data.items()}
    t["x"] = t["x"].permute(0, 3, 1, 2).contiguous()  # PyTorch backbones produce NCHW
    j = {k: jax.device_put(v) for k, v in data.items()}
    jalphas = jnp.asarray(alphas, jnp.float32)

    gem_fn = jax.jit(lambda x, att, a: ops.modulated_gem(x, att, a))
    sweep_fn = jax.jit(jax.vmap(lambda x, att, a: ops.modulated_gem(x, att, a), in_axes=(None, None, 0)))
    rbf_fn = jax.jit(lambda c, w, v: ops.rbf_attention_map(c, w, 16, 22, sigma=0.2, valid=v))
    salad_fn = jax.jit(lambda f, s, z, g: ops.salad_pool(f, s, z, g))
    salad_att_fn = jax.jit(lambda f, s, z, g, att, a: ops.salad_pool(f, s, z, g, att, a))
    half, one = jnp.float32(0.5), jnp.float32(1.0)
    return [
        (
            "modulated_gem [32,16,22,2048]",
            lambda: torch_modulated_gem(torch, t["x"], t["attention"], 0.5),
            lambda: gem_fn(j["x"], j["attention"], half),
        ),
        (
            f"alpha sweep x{len(alphas)} (modulated_gem)",
            lambda: [torch_modulated_gem(torch, t["x"], t["attention"], float(a)) for a in alphas],
            lambda: sweep_fn(j["x"], j["attention"], jalphas),
        ),
        (
            "rbf_attention_map B=256 N=8 -> 16x22",
            lambda: torch_rbf_map(torch, t["centers"], t["weights"], t["valid"], 16, 22),
            lambda: rbf_fn(j["centers"], j["weights"], j["valid"]),
        ),
        (
            "salad_pool B=32 23x23 (plain)",
            lambda: torch_salad(torch, t["f"], t["scores"], 1.0, t["g"]),
            lambda: salad_fn(j["f"], j["scores"], one, j["g"]),
        ),
        (
            "salad_pool B=32 23x23 (attention, alpha=0.5)",
            lambda: torch_salad(torch, t["f"], t["scores"], 1.0, t["g"], t["token_attention"], 0.5),
            lambda: salad_att_fn(j["f"], j["scores"], one, j["g"], j["token_attention"], half),
        ),
    ]


def check_agreement(torch_out, jax_out) -> float:
    """Max absolute difference between the two implementations' outputs (a sanity check of the benchmark)."""
    reference = np.stack([o.numpy() for o in torch_out]) if isinstance(torch_out, list) else torch_out.numpy()
    return float(np.max(np.abs(np.asarray(jax_out) - reference)))


def main(argv: list[str]) -> None:
    del argv
    resolved = {name: FLAGS[name].value for name in _FLAG_NAMES}
    print(f"flags: {resolved}")
    from benchmarks.torch_env import declare_missing_torchvision_ops

    declare_missing_torchvision_ops()
    import torch

    if FLAGS.torch_threads:
        torch.set_num_threads(FLAGS.torch_threads)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"with {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )

    alphas = np.linspace(0.0, 1.0, FLAGS.sweep_size).astype(np.float32)
    cases = build_cases(torch, make_inputs(np.random.default_rng(FLAGS.seed)), alphas)
    rows = []
    with torch.inference_mode():
        for name, torch_fn, jax_fn in cases:
            max_diff = check_agreement(torch_fn(), jax_fn())
            torch_ms = time_median(torch_fn, lambda out: out, FLAGS.warmup, FLAGS.repeats)
            ours_ms = time_median(jax_fn, jax.block_until_ready, FLAGS.warmup, FLAGS.repeats)
            rows.append(
                {
                    "op": name,
                    "torch_ms": torch_ms,
                    "ours_ms": ours_ms,
                    "ratio": torch_ms / ours_ms,
                    "max_abs_diff": max_diff,
                }
            )

    print(f"\n{'op':<46} {'torch ms':>10} {'ours ms':>10} {'torch/ours':>11} {'max |diff|':>11}")
    for r in rows:
        timings = f"{r['torch_ms']:>10.2f} {r['ours_ms']:>10.2f} {r['ratio']:>10.2f}x"
        print(f"{r['op']:<46} {timings} {r['max_abs_diff']:>11.1e}")
    if FLAGS.output:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(FLAGS.output, "w") as fh:
            json.dump({"flags": resolved, "results": rows}, fh, indent=2)
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
