"""The precision policy (``attllm_jax.models.precision``): float32 parity, bfloat16 accuracy, the compiled ops, ops
under bfloat16 inputs, the store key and the public boundary's checks.

Every family is covered by the small networks of ``tests/precision_cases.py`` (full-size ResNet-18/50 and VGG-16
trunks on 64x96 images; 2-block DINOv2s with SALAD, MegaLoc and BoQ heads; a small ResNet BoQ) with NumPy-drawn
weights, on renders of the demo's synthetic flooded streets stored in ``tests/data/precision_v0_2/expected.npz``
with the descriptors the code before the policy (4a689ad) computed from them.

Measured on CPU (XLA:CPU, this jaxlib) at alphas 0, 0.5, 1:
- float32 and tf32 equal the pre-policy descriptors bit for bit on the machine that recorded them (an AMD EPYC
  with AVX-512); other CPUs differ by round-off, so the test allows ``tests/round_off.CROSS_CPU_ATOL``;
- bfloat16 vs float32 descriptor cosine: min 0.999991 (EigenPlaces ResNet-50), median of the families' medians
  0.999999; the test asks >= 0.9999 here (the issue's floor is 0.99; full-size models in the README);
- cosine of the attention effect ``d(alpha=1) - d(alpha=0)`` between bfloat16 and float32: min 0.99989, its length
  within 2%.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).parent))
import precision_cases as pc  # noqa: E402
from round_off import CROSS_CPU_ATOL  # noqa: E402

import attllm_jax as aj  # noqa: E402
from attllm_jax import ops  # noqa: E402
from attllm_jax.checkpoint import save_model  # noqa: E402
from attllm_jax.models.precision import PRECISIONS, runtime_summary, validate_precision  # noqa: E402
from attllm_jax.models.vpr import VPRModel  # noqa: E402

EXPECTED = np.load(Path(__file__).parent / "data" / "precision_v0_2" / "expected.npz")
CASES = list(pc.CASES)


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


# Two families in the default suite (a GeM CNN, SALAD's Sinkhorn); all of them with -m slow.
DEFAULT_CASES = ("cosplace_resnet18", "salad")
CASE_PARAMS = [name if name in DEFAULT_CASES else pytest.param(name, marks=pytest.mark.slow) for name in CASES]


def _case_descriptors(name: str) -> dict:
    """``{precision: {alpha: [3, D]}}`` of one case (one model build)."""
    net, spec = pc.case_net(name), pc.case_spec(name)
    images = EXPECTED[f"{name}/images"]
    out = {}
    for precision in PRECISIONS:
        model = VPRModel(net, spec, precision)
        out[precision] = {
            a: np.asarray(model(images, None if a == 0.0 else EXPECTED["attention"], a)) for a in pc.ALPHAS
        }
    return out


class _Lazy(dict):
    def __missing__(self, name):
        self[name] = _case_descriptors(name)
        return self[name]


@pytest.fixture(scope="module")
def descriptors():
    """``{case: {precision: {alpha: [3, D]}}}``, each case computed when a test first asks for it."""
    return _Lazy()


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_float32_and_tf32_on_cpu_equal_the_pre_policy_descriptors(descriptors, name):
    for alpha in pc.ALPHAS:
        expected = EXPECTED[f"{name}/alpha_{alpha}"]
        # bit for bit on the machine that recorded them; other CPUs differ by round-off (tests/round_off.py)
        np.testing.assert_allclose(descriptors[name]["float32"][alpha], expected, atol=CROSS_CPU_ATOL, rtol=0)
        # tf32 is the backend's default precision: exact float32 on CPU
        np.testing.assert_array_equal(descriptors[name]["tf32"][alpha], descriptors[name]["float32"][alpha])


@pytest.mark.parametrize("name", CASE_PARAMS)
def test_bfloat16_descriptors_stay_close_and_the_attention_blend_keeps_its_direction(descriptors, name):
    f32, bf16 = descriptors[name]["float32"], descriptors[name]["bfloat16"]
    for alpha in pc.ALPHAS:
        assert np.abs(bf16[alpha] - f32[alpha]).max() > 0, "bfloat16 must actually change the arithmetic"
        assert cosine(bf16[alpha], f32[alpha]).min() >= 0.9999, (name, alpha)
    # weights near 0 (sky) and near 2 (a facade): the alpha effect is the same in bfloat16, and not lost in noise
    delta32, delta16 = f32[1.0] - f32[0.0], bf16[1.0] - bf16[0.0]
    assert np.linalg.norm(delta32, axis=-1).min() > 0.03
    assert cosine(delta16, delta32).min() >= 0.999, name
    np.testing.assert_allclose(np.linalg.norm(delta16, axis=-1), np.linalg.norm(delta32, axis=-1), rtol=0.02)


def _matmul_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "stablehlo.dot_general" in line or "stablehlo.convolution" in line]


@pytest.mark.parametrize("name", ["cosplace_resnet18", "boq_dinov2"])
def test_the_precision_reaches_every_compiled_matmul_and_convolution(name):
    net, spec = pc.case_net(name), pc.case_spec(name)
    images = jnp.asarray(EXPECTED[f"{name}/images"])
    args = (images, jnp.asarray(EXPECTED["attention"]), jnp.full((3,), 0.5, jnp.float32))
    # a global setting must not leak into the model's own (the suite runs with "highest"; here "default")
    with jax.default_matmul_precision("default"):
        lines = {}
        for precision in PRECISIONS:
            model = VPRModel(net, spec, precision)
            lines[precision] = _matmul_lines(model._jit_call.lower(model._state, *args).as_text())
    assert lines["float32"] and all("HIGHEST" in line for line in lines["float32"])
    # tf32: the backbone's products at the backend default (the ops' own explicit HIGHEST sums stay)
    assert sum("DEFAULT" in line for line in lines["tf32"]) >= len(lines["tf32"]) // 2
    assert not any("bf16" in line for line in lines["tf32"] + lines["float32"])
    # bfloat16: every linear and convolution layer of the backbone takes bfloat16 operands (the head stays float32)
    operands = [line.rsplit(" : ", 1)[1].split("->")[0] for line in lines["bfloat16"]]
    layers = sum(isinstance(m, (nnx.Linear, nnx.Conv)) for _, m in nnx.iter_graph(net.backbone))
    assert layers >= 9 and sum(text.count("xbf16>") == 2 for text in operands) >= layers
    assert sum(text.count("xbf16>") == 0 for text in operands) >= 1


def test_bfloat16_casts_only_the_backbone_layers_and_leaves_the_given_network_alone():
    net, spec = pc.case_net("salad"), pc.case_spec("salad")
    model = VPRModel(net, spec, "bfloat16")
    assert model.precision == "bfloat16" and "bfloat16" in repr(model)
    backbone = model.net.backbone
    assert backbone.blocks[0].attn.qkv.kernel.get_value().dtype == jnp.bfloat16
    assert backbone.patch_embed.proj.kernel.get_value().dtype == jnp.bfloat16
    assert backbone.blocks[0].norm1.scale.get_value().dtype == jnp.float32  # normalization stays float32
    assert backbone.pos_embed.get_value().dtype == jnp.float32
    assert model.net.aggregator.score.fc1.kernel.get_value().dtype == jnp.float32  # the head stays float32
    assert net.backbone.blocks[0].attn.qkv.kernel.get_value().dtype == jnp.float32  # the caller's net unchanged
    feats = model.features(EXPECTED["salad/images"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(feats))
    np.testing.assert_array_equal(model.aggregate(feats), model(EXPECTED["salad/images"]))
    # the precision survives a blend change in the tuner
    from attllm_jax.tuning.evaluate import with_blend

    cnn = VPRModel(pc.case_net("cosplace_resnet18"), pc.case_spec("cosplace_resnet18"), "bfloat16")
    assert with_blend(cnn, "uniform").precision == "bfloat16"


def test_load_model_takes_the_precision_and_checks_it_first(tmp_path):
    net, spec = pc.case_net("megaloc"), pc.case_spec("megaloc")
    save_model(tmp_path / "m", net, spec)
    images = EXPECTED["megaloc/images"]
    f32, bf16 = aj.load_model(tmp_path / "m"), aj.load_model(tmp_path / "m", precision="bfloat16")
    assert (f32.precision, bf16.precision) == ("float32", "bfloat16")
    np.testing.assert_array_equal(f32(images), VPRModel(net, spec)(images))
    np.testing.assert_array_equal(bf16(images), VPRModel(net, spec, "bfloat16")(images))
    for bad in ("fp16", "Float32", "", None, 16):
        with pytest.raises(ValueError, match=r"precision must be one of float32, tf32, bfloat16; got"):
            aj.load_model(tmp_path / "does-not-exist", precision=bad)  # checked before the directory
        with pytest.raises(ValueError, match="float32, tf32, bfloat16"):
            VPRModel(net, spec, bad)
    with pytest.raises(ValueError, match=r"--precision must be one of .*got 'half'"):
        validate_precision("half", "--precision")


def test_runtime_summary_names_backend_devices_and_precision():
    line = runtime_summary("bfloat16")
    assert line.startswith(f"backend {jax.default_backend()}: {jax.device_count()} device")
    assert line.endswith("precision bfloat16 (matmul default)")
    assert runtime_summary("float32").endswith("precision float32 (matmul highest)")


def _bf16(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)


def test_every_op_takes_bfloat16_inputs_and_returns_float32():
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(2, 4, 5, 8))).astype(np.float32)
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    att = rng.uniform(0, 2, (2, 3, 3)).astype(np.float32)
    alpha = np.array([0.0, 0.7], np.float32)
    centers, weights = rng.uniform(0, 1, (2, 3, 2)).astype(np.float32), rng.uniform(0, 2, (2, 3)).astype(np.float32)
    grid = rng.uniform(0, 2, (2, 4, 4)).astype(np.float32)
    scores, local = rng.normal(size=(2, 4, 20)).astype(np.float32), rng.normal(size=(2, 20, 6)).astype(np.float32)
    token = rng.normal(size=(2, 5)).astype(np.float32)
    calls = {
        "gem": lambda c: ops.gem(c(x), p=3.0),
        "modulated_gem": lambda c: ops.modulated_gem(c(x), c(att), c(alpha), p=3.0),
        "modulated_gem uniform": lambda c: ops.modulated_gem(c(x), c(att), c(alpha), blend="uniform"),
        "rbf_attention_map": lambda c: ops.rbf_attention_map(c(centers), c(weights), 4, 5, sigma=0.2),
        "grid_attention_map": lambda c: ops.grid_attention_map(c(grid), 6, 6, interpolate=True),
        "resize_attention": lambda c: ops.resize_attention(c(att), 5, 7),
        "log_sinkhorn_assignment": lambda c: ops.log_sinkhorn_assignment(c(scores), c(np.float32(1.0))),
        "salad_pool": lambda c: ops.salad_pool(
            c(local), c(scores), c(np.float32(1.0)), c(token), c(local[..., 0]), 0.6
        ),
        "l2_normalize": lambda c: ops.l2_normalize(c(local)),
        "bicubic_resize_scale_factor": lambda c: ops.bicubic_resize_scale_factor(c(x), 1.5),
    }
    for name, call in calls.items():
        low, ref = call(_bf16), call(lambda v: jnp.asarray(v, jnp.float32) if np.ndim(v) else v)
        low_from_rounded = call(lambda v: _bf16(v).astype(jnp.float32))
        assert low.dtype == jnp.float32, name
        assert np.all(np.isfinite(np.asarray(low))), name
        # computed in float32 from the rounded inputs: equal to float32 on the same (rounded) values
        np.testing.assert_allclose(low, low_from_rounded, atol=1e-6, rtol=1e-6, err_msg=name)
        np.testing.assert_allclose(low, ref, atol=0.05, rtol=0.05, err_msg=name)
    # under jit and with a bfloat16 alpha grid too
    jitted = jax.jit(lambda a: ops.modulated_gem(_bf16(x), _bf16(att), a))(_bf16(alpha))
    assert jitted.dtype == jnp.float32


def test_the_store_key_carries_the_precision_and_a_bad_precision_is_refused(tmp_path):
    from attllm_jax.evaluation import EvalConfig, random_cosplace_model
    from attllm_jax.evaluation.extract import database_store_key

    f32 = random_cosplace_model(0)
    tf32 = VPRModel(f32.net, f32.spec, "tf32")
    key32 = database_store_key(f32, _FakeImages(), weights_sha256="w")
    key_tf = database_store_key(tf32, _FakeImages(), weights_sha256="w")
    assert key32["precision"] == "float32" and key_tf["precision"] == "tf32" and key32 != key_tf
    folders = {"database_folder": str(tmp_path), "queries_folder": str(tmp_path), "output_dir": str(tmp_path / "o")}
    with pytest.raises(ValueError, match="--precision must be one of"):
        EvalConfig(**folders, precision="fp8").validated()


@pytest.mark.slow  # four evaluations, three precisions compiled (23 s on the quiet 2-core machine)
def test_a_store_built_at_one_precision_is_not_reused_at_another(tmp_path):
    from attllm_jax.data.synthetic import SyntheticConfig, generate_benchmark
    from attllm_jax.evaluation import EvalConfig, run_evaluation

    bench = generate_benchmark(
        tmp_path / "data",
        SyntheticConfig(num_streets=1, street_length_m=60.0, num_queries=2, image_height=48, image_width=64, seed=3),
    )
    base = dict(
        database_folder=str(bench.database),
        queries_folder=str(bench.queries),
        output_dir=str(tmp_path / "out"),
        alphas=(0.0,),
        recall_values=(1,),
        image_size=48,
        batch_size=4,
    )
    status = {}
    for precision in ("float32", "float32", "bfloat16", "tf32"):
        result = run_evaluation(EvalConfig(**base, precision=precision), model=None)
        status.setdefault(precision, []).append(result.results["store"]["status"])
        assert result.results["precision"] == precision
        assert result.model.precision == precision
    assert status == {"float32": ["created", "reused"], "bfloat16": ["rebuilt"], "tf32": ["rebuilt"]}


class _FakeImages:
    """The one thing the store key reads from an image set."""

    def fingerprint(self):
        return {"count": 0}


def test_a_bfloat16_model_runs_under_vmap_sweep_and_keeps_its_state_dtypes():
    net, spec = pc.case_net("boq_resnet50"), pc.case_spec("boq_resnet50")
    model = VPRModel(net, spec, "bfloat16")
    images = EXPECTED["boq_resnet50/images"]
    feats = model.features(images)
    sweep = model.aggregate_sweep(feats, EXPECTED["attention"], [0.0, 0.5, 1.0])
    for k, alpha in enumerate(pc.ALPHAS):
        np.testing.assert_allclose(sweep[k], model.aggregate(feats, EXPECTED["attention"], alpha), atol=2e-6)
    kernels = [v.get_value().dtype for _, v in nnx.to_flat_state(nnx.state(model.net.backbone, nnx.Param))]
    assert jnp.bfloat16 in kernels and jnp.float32 in kernels  # convolutions bf16, BatchNorm scale/bias f32


@pytest.mark.parametrize("kernel,stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
def test_pointwise_conv_equals_the_convolution(kernel, stride):
    from attllm_jax.models.precision import pointwise_conv

    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.normal(size=(2, 9, 11, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 8, 5)), jnp.float32)
    pad = ((kernel // 2, kernel // 2),) * 2
    numbers = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    args = dict(dimension_numbers=numbers, precision=jax.lax.Precision.HIGHEST)
    ours = pointwise_conv(x, w, (stride, stride), pad, **args)
    ref = jax.lax.conv_general_dilated(x, w, (stride, stride), pad, **args)
    assert ours.shape == ref.shape
    # the same sums in another order (measured 9.5e-7 on values of magnitude ~3); other kernels are passed through
    np.testing.assert_allclose(ours, ref, atol=2e-6 if kernel == 1 else 0, rtol=0)
    low = pointwise_conv(
        x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (stride, stride), pad, dimension_numbers=numbers
    )
    assert low.dtype == jnp.bfloat16


def test_doctor_prints_backend_devices_precisions_and_versions():
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(repo)}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.doctor"], cwd=repo, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines())
    assert lines["backend"].strip() == jax.default_backend()
    assert lines["jax"].strip() == jax.__version__ and lines["flax"].strip() == __import__("flax").__version__
    assert lines["numpy"].strip() == np.__version__ and "jaxlib" in lines and "torch" in lines
    assert "float32 -> matmul highest" in lines["model precisions"]
