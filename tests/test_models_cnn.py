"""CosPlace / EigenPlaces parity with PyTorch, converter strictness, the registry and VPRModel.

References: ``benchmarks.torch_baselines.TorchCosPlace`` (torchvision backbone truncated as upstream + the
``L2Norm -> GeM -> Linear -> L2Norm`` head with upstream's module names), seeded random weights with non-trivial
BatchNorm statistics and GeM p != 3, saved with ``torch.save`` and read back by the production converter. The
attention path is checked against a PyTorch transcription of docs/DESIGN.md's modulated GeM. Tolerances (float32,
highest matmul precision): descriptors max abs error <= 2e-6 and cosine >= 0.99999; intermediate maps (values
of order 1) max abs error <= 1e-5 * max(1, max |reference|). Measured on the 2-core development CPU (every parity
comparison here, ResNet-101/152 included): descriptors <= 3.5e-7, maps <= 2.7e-6 (relative as above); the bounds
leave room for another CPU's kernels (tests/round_off.py: ~3e-7 between CPUs on unit descriptors).
"""

import numpy as np
import pytest
from flax import nnx

from attllm_jax.convert.common import ConversionError
from attllm_jax.models import registry
from tests.marks import slow_after

torch = pytest.importorskip("torch")
F = torch.nn.functional

from attllm_jax.convert import convert_file  # noqa: E402
from attllm_jax.convert.common import TensorSource  # noqa: E402
from attllm_jax.convert.cosplace import CnnConvertOptions  # noqa: E402
from attllm_jax.models.features import CnnFeatures  # noqa: E402
from attllm_jax.models.spec import ModelSpec  # noqa: E402
from attllm_jax.models.vpr import VPRModel  # noqa: E402
from benchmarks.torch_baselines import TorchCosPlace, randomize_batchnorm_stats_  # noqa: E402

pytestmark = pytest.mark.torch

DESC_ATOL = 2e-6  # measured <= 3.5e-7
MAP_RTOL = 1e-5  # x max(1, max |reference|); measured <= 2.7e-6
MIN_COSINE = 0.99999
GEM_P = {"ResNet18": 3.7, "ResNet50": 2.6, "VGG16": 4.1, "ResNet101": 3.3, "ResNet152": 2.8}
# torch Sequential index after which each of our stages ends
RESNET_STAGES = {"stem": 3, "layer1": 4, "layer2": 5, "layer3": 6, "layer4": 7}
VGG_STAGES = {"pool1": 4, "pool2": 9, "pool3": 16, "pool4": 23, "features": 28}

_CACHE = {}


def torch_reference(backbone: str, dim: int = 64) -> TorchCosPlace:
    generator = torch.Generator().manual_seed(sum(map(ord, backbone)))
    torch.manual_seed(sum(map(ord, backbone)))
    model = TorchCosPlace(backbone, fc_output_dim=dim, gem_p=GEM_P[backbone])
    return randomize_batchnorm_stats_(model, generator).eval()


def converted(backbone: str, tmp_path_factory, family: str = "cosplace"):
    """(torch model, checkpoint path, our net, spec), built once per backbone."""
    if backbone not in _CACHE:
        model = torch_reference(backbone)
        path = tmp_path_factory.mktemp("ckpt") / f"{backbone}_64_{family}.pth"
        torch.save(model.state_dict(), path)
        _CACHE[backbone] = (model, path)
    model, path = _CACHE[backbone]
    net, spec = convert_cosplace(path, family=family)
    return model, path, net, spec


def convert_cosplace(path, family: str = "cosplace", **options):
    return convert_file(family, path, options=CnnConvertOptions(**options))


def images(seed: int = 0, batch: int = 2, height: int = 64, width: int = 96) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 1)


def assert_descriptors_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= DESC_ATOL, np.abs(ours - ref).max()
    cos = np.sum(ours * ref, axis=1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= MIN_COSINE, cos


def assert_map_close(ours, ref_nchw, name):
    ref = nhwc(ref_nchw)
    ours = np.asarray(ours)
    assert ours.shape == ref.shape, (name, ours.shape, ref.shape)
    tol = MAP_RTOL * max(1.0, float(np.abs(ref).max()))
    assert np.abs(ours - ref).max() <= tol, (name, np.abs(ours - ref).max())


def assert_same_state(a, b):
    flat_a, flat_b = dict(nnx.to_flat_state(nnx.state(a))), dict(nnx.to_flat_state(nnx.state(b)))
    assert flat_a.keys() == flat_b.keys()
    for key, var in flat_a.items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(flat_b[key].get_value()), err_msg=key)


def torch_stages(model: TorchCosPlace, x: torch.Tensor, stages: dict[str, int]) -> dict[str, torch.Tensor]:
    out, ends = {}, {v: k for k, v in stages.items()}
    with torch.inference_mode():
        for i, layer in enumerate(model.backbone):
            x = layer(x)
            if i in ends:
                out[ends[i]] = x
    return out


def torch_modulated_gem(x, attention, alpha, p, eps=1e-6, blend="native"):
    """docs/DESIGN.md's modulated GeM in PyTorch. x [B, C, h, w] L2-normalized, attention [B, h', w']."""
    b, _, h, w = x.shape
    xp = x.clamp(min=eps).pow(p)
    hw = h * w
    c = (xp.sum(1) / (hw + eps)).clamp(min=eps).pow(1.0 / p)  # [B, h, w]
    native = c / (c.mean(dim=(1, 2), keepdim=True) + eps) if blend == "native" else torch.ones_like(c)
    a = F.interpolate(attention[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0].clamp(0.0, 2.0)
    alpha = torch.as_tensor(alpha, dtype=x.dtype).reshape(-1, 1, 1).expand(b, 1, 1)
    weights = native + alpha * (a - native)
    pooled = (weights[:, None] * xp).sum((2, 3)) / (weights.sum((1, 2))[:, None] + eps)
    plain = xp.mean((2, 3))
    return torch.where(alpha[:, :, 0] > 1e-6, pooled, plain).pow(1.0 / p)


def torch_descriptors_with_attention(model: TorchCosPlace, x, attention, alpha, blend="native"):
    with torch.inference_mode():
        feats = F.normalize(model.backbone(x), p=2.0, dim=1)
        pooled = torch_modulated_gem(feats, attention, alpha, model.aggregation[1].p, blend=blend)
        return F.normalize(model.aggregation[3](pooled), p=2.0, dim=1)


# ------------------------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("backbone", slow_after(["ResNet18", "ResNet50", "VGG16"]))
def test_parity_stages_and_descriptors(backbone, tmp_path_factory):
    model, _, net, spec = converted(backbone, tmp_path_factory)
    assert spec.backbone == backbone.lower() and spec.descriptor_dim == 64
    assert float(net.aggregation.p[...][0]) == pytest.approx(GEM_P[backbone])
    x = images(1)
    stages = VGG_STAGES if backbone == "VGG16" else RESNET_STAGES
    ref_stages = torch_stages(model, x, stages)
    # one compiled function instead of op-by-op dispatch keeps the test fast
    ours, descriptors = nnx.jit(lambda n, images: (n.backbone.stages(images), n(images)))(net, nhwc(x))
    assert set(ours) == set(ref_stages)
    for name in stages:
        assert_map_close(ours[name], ref_stages[name], name)
    with torch.inference_mode():
        ref = model(x).numpy()
    assert_descriptors_close(descriptors, ref)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["ResNet101", "ResNet152"])
def test_parity_deep_resnets(backbone, tmp_path):
    model = torch_reference(backbone, dim=128)
    path = tmp_path / "deep.pth"
    torch.save(model.state_dict(), path)
    net, spec = convert_cosplace(path, family="eigenplaces", backbone=backbone, fc_output_dim=128)
    assert (spec.family, spec.backbone, spec.descriptor_dim) == ("eigenplaces", backbone.lower(), 128)
    x = images(4, batch=1)
    with torch.inference_mode():
        ref = model(x).numpy()
    assert_descriptors_close(VPRModel(net, spec)(nhwc(x)), ref)


# ------------------------------------------------------------------------------------------------ converter


def test_random_weights_under_a_release_name_are_not_labelled_as_the_release(tmp_path_factory):
    _, path, _, spec = converted("ResNet18", tmp_path_factory)
    assert path.name == registry.lookup("cosplace", "ResNet18", 64).file_name == "ResNet18_64_cosplace.pth"
    assert spec.provenance.published_file is None  # the content is not the release's, whatever the name says


def test_eigenplaces_family_and_flags(tmp_path_factory):
    _, path, net, spec = converted("ResNet18", tmp_path_factory, family="eigenplaces")
    assert spec.family == "eigenplaces" and spec.architecture.features_dim == 512
    assert spec.provenance.published_file is None  # no EigenPlaces ResNet18 with dim 64 was released
    assert len(spec.provenance.source_sha256) == 64 and spec.provenance.source_file == path.name
    same, _ = convert_cosplace(path, backbone="resnet18", fc_output_dim=64)
    assert_same_state(net, same)


def test_flags_contradicting_shapes_fail(tmp_path_factory):
    _, path, _, _ = converted("ResNet18", tmp_path_factory)
    with pytest.raises(ConversionError, match="--backbone=ResNet50 but the checkpoint holds a resnet18"):
        convert_cosplace(path, backbone="ResNet50")
    with pytest.raises(ConversionError, match=r"--fc_output_dim=512 but 'aggregation.3.weight' has shape \[64, 512\]"):
        convert_cosplace(path, fc_output_dim=512)


def _edited_checkpoint(tmp_path_factory, edit) -> str:
    model, _, _, _ = converted("ResNet18", tmp_path_factory)
    sd = dict(model.state_dict())
    edit(sd)
    path = tmp_path_factory.mktemp("edited") / "edited.pth"
    torch.save(sd, path)
    return path


def test_missing_tensor_is_named(tmp_path_factory):
    path = _edited_checkpoint(tmp_path_factory, lambda sd: sd.pop("backbone.5.1.bn2.running_var"))
    with pytest.raises(ConversionError, match="missing source tensor 'backbone.5.1.bn2.running_var'") as err:
        convert_cosplace(path)
    assert "1 problem(s)" in str(err.value)


def test_extra_tensor_is_named(tmp_path_factory):
    path = _edited_checkpoint(tmp_path_factory, lambda sd: sd.__setitem__("backbone.8.weight", torch.zeros(3, 4)))
    with pytest.raises(ConversionError, match=r"unused source tensor 'backbone.8.weight' \[3, 4\]"):
        convert_cosplace(path)


def test_wrong_shape_is_named(tmp_path_factory):
    path = _edited_checkpoint(
        tmp_path_factory, lambda sd: sd.__setitem__("backbone.6.0.conv1.weight", torch.zeros(256, 128, 3, 1))
    )
    with pytest.raises(ConversionError) as err:
        convert_cosplace(path)
    assert (
        "shape mismatch for 'backbone/layer3/0/conv1/kernel': expected [3, 3, 128, 256], got [3, 1, 128, 256] "
        "(source 'backbone.6.0.conv1.weight' [256, 128, 3, 1])" in str(err.value)
    )


def test_num_batches_tracked_is_ignored_but_nothing_else(tmp_path_factory):
    """The converter's ignore list covers exactly BatchNorm's counters: they are in the checkpoint and left unused
    without error, while another unused BatchNorm-like tensor is reported."""
    model, _, _, _ = converted("ResNet18", tmp_path_factory)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    counters = [k for k in sd if k.endswith("num_batches_tracked")]
    source = TensorSource(sd)
    assert len(counters) == 20 and all(source.is_ignored(k) for k in counters)
    assert not source.is_ignored("backbone.1.running_count") and not source.is_ignored("num_batches")
    path = _edited_checkpoint(tmp_path_factory, lambda sd: sd.__setitem__("backbone.1.running_count", torch.ones(1)))
    with pytest.raises(ConversionError, match=r"(?s)1 problem\(s\).*unused source tensor 'backbone.1.running_count'"):
        convert_cosplace(path)


def test_wrong_family_salad_checkpoint(tmp_path):
    sd = {
        "backbone.model.cls_token": torch.zeros(1, 1, 8),
        "backbone.model.blocks.0.attn.qkv.weight": torch.zeros(24, 8),
        "aggregator.dust_bin": torch.tensor(1.0),
    }
    path = tmp_path / "dino_salad.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ConversionError, match="not a cosplace checkpoint.*use converters/salad.py"):
        convert_cosplace(path)


def test_unsupported_resnet_depth(tmp_path):
    import torchvision

    backbone = torch.nn.Sequential(*list(torchvision.models.resnet34().children())[:-2])
    sd = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    sd.update({"aggregation.1.p": torch.ones(1), "aggregation.3.weight": torch.zeros(8, 512)})
    sd["aggregation.3.bias"] = torch.zeros(8)
    path = tmp_path / "r34.pth"
    torch.save(sd, path)
    with pytest.raises(ConversionError, match=r"unsupported ResNet: basic blocks per stage \[3, 4, 6, 3\]"):
        convert_cosplace(path)


def test_truncated_checkpoint_fails_cleanly(tmp_path_factory, tmp_path):
    _, path, _, _ = converted("ResNet18", tmp_path_factory)
    data = path.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ConversionError, match="cut.pth"):
        convert_cosplace(cut)


def test_safetensors_source(tmp_path_factory, tmp_path):
    from safetensors.torch import save_file

    model, _, net, _ = converted("ResNet18", tmp_path_factory)
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    net2, spec = convert_cosplace(path)
    assert_same_state(net, net2)
    assert spec.provenance.source_file == "r18.safetensors"


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lookup_and_errors():
    entry = registry.lookup("CosPlace", "ResNet50", 2048)
    assert entry.url == "https://github.com/gmberton/CosPlace/releases/download/v1.0/ResNet50_2048_cosplace.pth"
    assert registry.lookup("eigenplaces", "vgg16", 512).file_name == "VGG16_512_eigenplaces.pth"
    salad = registry.lookup("salad", "dinov2_vitb14", 8448)
    assert salad.url == "https://github.com/serizba/salad/releases/download/v1.0.0/dino_salad.ckpt"
    with pytest.raises(ValueError, match="eigenplaces/resnet18/256, eigenplaces/resnet18/512") as err:
        registry.lookup("eigenplaces", "ResNet18", 32)
    assert "cosplace/" not in str(err.value)
    # Files a converter downloads are release assets named by their URL and one per (family, backbone, dim); the
    # others (CliqueMining on Google Drive, MegaLoc's superseded megaloc.torch) share an architecture with one.
    auto = [e for e in registry.PUBLISHED if e.auto_download]
    assert all(e.url.endswith("/" + e.file_name) for e in auto)
    assert len({(e.family, e.backbone, e.descriptor_dim) for e in auto}) == len(auto)
    # one release file per (family, file, dimension): NetVLAD's Pitts30K_struct.mat serves 4096-d and 32768-d
    assert len({(e.family, e.file_name, e.descriptor_dim) for e in registry.PUBLISHED}) == len(registry.PUBLISHED)


def test_spec_build_shapes_and_errors():
    for backbone, channels in [("resnet18", 512), ("ResNet50", 2048), ("VGG16", 512)]:
        spec = ModelSpec.cosplace(backbone, 32)
        net = nnx.eval_shape(lambda spec=spec: spec.build())
        assert net.aggregation.fc.kernel.shape == (channels, 32)
        assert spec.architecture.features_dim == channels
    with pytest.raises(ValueError, match="unknown model family 'vlad9'"):
        registry.family_entry("vlad9")
    with pytest.raises(ValueError, match="unknown CNN backbone 'resnet34'"):
        ModelSpec.cosplace("resnet34", 8)


# ------------------------------------------------------------------------------------------------ VPRModel


@pytest.fixture(scope="module")
def vpr(tmp_path_factory):
    model, _, net, spec = converted("ResNet18", tmp_path_factory)
    return model, VPRModel(net, spec)


def test_vpr_model_matches_torch_and_compiles_once_per_shape(vpr):
    torch_model, model = vpr
    x = images(7)
    with torch.inference_mode():
        ref = torch_model(x).numpy()
    start = model.trace_counts["__call__"]
    assert_descriptors_close(model(nhwc(x)), ref)
    model(nhwc(images(8)))  # same shape, other values: no retrace
    assert model.trace_counts["__call__"] == start + 1
    model(nhwc(images(9, height=32, width=32)))  # new shape: one more
    model(nhwc(images(10, height=32, width=32)))
    assert model.trace_counts["__call__"] == start + 2


def test_vpr_model_attention_path_matches_torch(vpr):
    torch_model, model = vpr
    x = images(11)
    attention = np.random.default_rng(0).uniform(0, 2, (2, 4, 5)).astype(np.float32)
    feats = model.features(nhwc(x))
    assert model.feature_grid(feats) == (2, 3)
    with torch.inference_mode():
        plain = torch_model(x).numpy()
    assert_descriptors_close(model.aggregate(feats), plain)
    n = model.trace_counts["aggregate"]
    for alpha in (0.5, 1.0, [0.25, 0.0]):
        ref = torch_descriptors_with_attention(torch_model, x, torch.from_numpy(attention), alpha)
        assert_descriptors_close(model.aggregate(feats, attention, alpha), ref.numpy())
    assert model.trace_counts["aggregate"] == n + 2  # one trace per alpha shape, not per value
    ref = torch_descriptors_with_attention(torch_model, x, torch.from_numpy(attention), 0.7)
    assert_descriptors_close(model(nhwc(x), attention, 0.7), ref.numpy())  # end to end
    # alpha = 0 with attention is plain CosPlace, and attention does change the descriptor
    assert_descriptors_close(model.aggregate(feats, attention, 0.0), plain)
    assert np.abs(np.asarray(model.aggregate(feats, attention, 1.0)) - plain).max() > 1e-3


def test_uniform_blend_head(vpr):
    from attllm_jax.models.heads import GeMHead

    torch_model, model = vpr
    x = images(13)
    attention = np.random.default_rng(2).uniform(0, 2, (2, 3, 3)).astype(np.float32)
    head = GeMHead(512, 64, blend="uniform", rngs=nnx.Rngs(0))
    nnx.update(head, nnx.state(model.net.aggregation))
    feats = model.features(nhwc(x))
    ref = torch_descriptors_with_attention(torch_model, x, torch.from_numpy(attention), 0.6, blend="uniform")
    assert_descriptors_close(head(feats.maps, attention, 0.6), ref.numpy())
    native = torch_descriptors_with_attention(torch_model, x, torch.from_numpy(attention), 0.6)
    assert np.abs(ref.numpy() - native.numpy()).max() > 1e-4  # the two blends differ
    with pytest.raises(ValueError, match="unknown blend 'max'"):
        GeMHead(4, 2, blend="max", rngs=nnx.Rngs(0))


def test_vpr_model_aggregate_sweep(vpr):
    _, model = vpr
    feats = model.features(nhwc(images(11)))
    attention = np.random.default_rng(1).uniform(0, 2, (2, 4, 4)).astype(np.float32)
    alphas = [0.0, 0.3, 1.0]
    sweep = np.asarray(model.aggregate_sweep(feats, attention, alphas))
    assert sweep.shape == (3, 2, 64)
    for k, alpha in enumerate(alphas):
        np.testing.assert_allclose(sweep[k], model.aggregate(feats, attention, alpha), atol=1e-6)
    n = model.trace_counts["aggregate_sweep"]
    model.aggregate_sweep(feats, attention, [0.1, 0.2, 0.9])
    assert model.trace_counts["aggregate_sweep"] == n


def test_vpr_model_validates_inputs(vpr):
    _, model = vpr
    x = nhwc(images(12))
    att = np.ones((2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
        model(x, attention=att, alpha=1.5)
    with pytest.raises(ValueError, match="alphas must lie in"):
        model.aggregate_sweep(CnnFeatures(np.zeros((2, 2, 3, 512), np.float32)), att, [0.0, -0.1])
    with pytest.raises(
        ValueError, match="feats must be the Features pytree that model.features.. returns, got ndarray"
    ):
        model.aggregate(np.zeros((2, 2, 3, 512), np.float32))
    with pytest.raises(ValueError, match=r"images must have shape \[B, H, W, 3\]"):
        model(x[..., :2])
    with pytest.raises(ValueError, match=r"attention must have shape \[B, h, w\]"):
        model(x, attention=att[0], alpha=0.5)
