"""BoQ (DINOv2 and ResNet-50): parity with PyTorch through the production converter, attention, strictness.

The reference (:mod:`benchmarks.torch_zoo`) follows amaralibey/Bag-of-Queries at HEAD: transformers' DINOv2
(upstream interpolation) WITHOUT its final norm, or torchvision's ResNet-50 cut after ``layer3``; the BoQ head from
torch's own ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention``, whose returned head-averaged
cross-attention weights are compared too. The query-side attention path is written there with torch's
``MultiheadAttention`` and an additive float ``attn_mask``. Small sizes: 128 projected channels (2 heads of 64),
8 queries, 2 blocks, row_dim 4 (descriptor 512). Tolerances (float32, highest matmul precision; measured ~1e-7):
descriptors 1e-5; maps and tokens ``atol 1e-4 + rtol 1e-5``; attention weights 1e-6.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from torch_helpers import convert_and_load_without_torch, nhwc  # noqa: E402

from attllm_jax.convert.boq import BoQConvertOptions, convert_state_dict  # noqa: E402
from attllm_jax.convert.common import ConversionError, read_state_dict  # noqa: E402
from attllm_jax.data.preprocess import PreprocessSpec  # noqa: E402
from attllm_jax.models.features import CnnFeatures  # noqa: E402
from benchmarks.torch_zoo import RELEASED_BOQ_ARCH, make_torch_boq  # noqa: E402

pytestmark = pytest.mark.torch
HEADS_4 = BoQConvertOptions(backbone_num_heads=4)  # the tiny reference DINOv2 (width 64) has 4 heads

DESC_ATOL = 1e-5
MAP_ATOL, MAP_RTOL = 1e-4, 1e-5
WEIGHT_ATOL = 1e-6
GRAD_RTOL = 1e-3
IMAGE_HW = {"dinov2": (70, 98), "resnet50": (64, 96)}  # 5 x 7 and 4 x 6 token grids


_CACHE = {}


def _reference(backbone: str):
    if backbone not in _CACHE:
        _CACHE[backbone] = make_torch_boq(torch.Generator().manual_seed(2), backbone=backbone)
    return _CACHE[backbone]


# BoQ-ResNet50 shares the head with BoQ-DINOv2: its small parity runs with -m slow (full size: test_full_size_...)
@pytest.fixture(scope="module", params=["dinov2", pytest.param("resnet50", marks=pytest.mark.slow)])
def case(request, tmp_path_factory):
    """(backbone, reference, converted net, config, images, attention); the checkpoint goes through torch.save."""
    backbone = request.param
    reference = _reference(backbone)
    path = tmp_path_factory.mktemp("boq") / f"{backbone}_512.pth"
    torch.save(reference.upstream_state_dict(), path)
    net, config = convert_state_dict(read_state_dict(path), "boq", str(path), HEADS_4)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, *IMAGE_HW[backbone], generator=g)
    attention = 2.0 * torch.rand(2, 3, 4, generator=g)
    return backbone, reference, net, config, images, attention


@nnx.jit
def _describe(net, images, attention=None, alpha=0.0):
    return net(images, attention, alpha)


@nnx.jit
def _features(net, images):
    return net.features(images)


@nnx.jit
def _intermediates(net, feats, attention, alpha):
    return net.aggregator.intermediates(feats.maps, attention, alpha)


def test_config_is_inferred_from_the_shapes(case):
    backbone, _, _, spec, _, _ = case
    config = spec.architecture
    assert spec.family == "boq" and config.kind == backbone and spec.descriptor_dim == 512
    assert spec.backbone == ("dinov2_custom" if backbone == "dinov2" else "resnet_custom")
    size = (322, 322) if backbone == "dinov2" else (384, 384)
    assert spec.preprocess == PreprocessSpec("exact", size, stage="tensor")
    assert (config.proj_channels, config.num_queries, config.num_layers, config.row_dim) == (128, 8, 2, 4)
    assert config.num_heads == 2 and config.descriptor_dim == 512
    if backbone == "resnet50":
        assert config.resnet_layers == (1, 1, 1) and config.resnet.layers == (1, 1, 1, 0) and config.in_channels == 1024
    else:
        assert (config.dinov2.embed_dim, config.dinov2.depth, config.dinov2.num_heads) == (64, 2, 4)


def test_backbone_matches_torch_stage_by_stage(case):
    """DINOv2: the tokens after every block (no final norm at the end). ResNet: stem and layer1..layer3."""
    backbone, reference, net, _, images, _ = case
    x = jnp.asarray(nhwc(images))
    if backbone == "resnet50":
        seq = reference.backbone.net
        expected, y = [], images
        with torch.no_grad():
            for i, layer in enumerate(seq):
                y = layer(y)
                if i >= 3:
                    expected.append(nhwc(y))
        ours = nnx.jit(lambda n, im: n.backbone.stages(im))(net, x)
        for name, ref in zip(("stem", "layer1", "layer2", "layer3"), expected, strict=True):
            np.testing.assert_allclose(ours[name], ref, rtol=MAP_RTOL, atol=MAP_ATOL * max(1.0, np.abs(ref).max()))
    else:
        with torch.no_grad():
            hidden = reference.backbone.dino(pixel_values=images, output_hidden_states=True).hidden_states

        def blocks(n, im):
            tokens = [n.backbone.prepare_tokens(im)]
            for block in n.backbone.blocks:
                tokens.append(block(tokens[-1]))
            return tokens

        for ours, ref in zip(nnx.jit(blocks)(net, x), hidden, strict=True):
            np.testing.assert_allclose(ours, ref.numpy(), rtol=MAP_RTOL, atol=MAP_ATOL)
    with torch.no_grad():
        expected_map = nhwc(reference.backbone(images))
    feats = _features(net, x)
    assert isinstance(feats, CnnFeatures) and feats.grid == expected_map.shape[1:3]
    np.testing.assert_allclose(feats.maps, expected_map, rtol=MAP_RTOL, atol=MAP_ATOL)


@pytest.mark.parametrize("alpha", [None, (0.6, 0.0)])
def test_head_weights_and_descriptor_match_torch(case, alpha):
    """The aggregator on identical inputs: every block's head-averaged cross-attention weights and the descriptor."""
    _, reference, net, _, images, attention = case
    att = None if alpha is None else attention
    a = 0.0 if alpha is None else torch.tensor(alpha)
    with torch.no_grad():
        feature_map = reference.backbone(images)
        expected, expected_weights = reference.aggregator(feature_map, att, a)
    feats = CnnFeatures(maps=jnp.asarray(nhwc(feature_map)))
    att_j = None if att is None else jnp.asarray(att.numpy())
    ours, weights = _intermediates(net, feats, att_j, jnp.asarray(np.asarray(a, np.float32)))
    assert len(weights) == 2 and weights[0].shape == expected_weights[0].shape
    for w, e in zip(weights, expected_weights, strict=True):
        np.testing.assert_allclose(np.sum(w, axis=-1), 1.0, atol=1e-6)
        np.testing.assert_allclose(w, e.numpy(), atol=WEIGHT_ATOL, rtol=0)
    np.testing.assert_allclose(ours, expected.numpy(), atol=DESC_ATOL, rtol=0)


@pytest.mark.parametrize("alpha", [None, (0.3, 1.0)])
def test_descriptors_match_torch(case, alpha):
    """End to end; upstream's channel-major flatten (element c * row_dim + r) is what the reference does."""
    _, reference, net, _, images, attention = case
    att = None if alpha is None else attention
    a = 0.0 if alpha is None else torch.tensor(alpha)
    with torch.no_grad():
        expected = reference(images, att, a).numpy()
    att_j = None if att is None else jnp.asarray(att.numpy())
    ours = _describe(net, jnp.asarray(nhwc(images)), att_j, jnp.asarray(np.asarray(a, np.float32)))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, expected, atol=DESC_ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- attention


def test_attention_is_live_and_alpha_zero_is_plain(case):
    _, _, net, _, images, attention = case
    x, att = jnp.asarray(nhwc(images)), jnp.asarray(attention.numpy())
    plain = np.asarray(_describe(net, x))
    # Another compiled graph (with the attention inputs) than the plain call, hence round-off rather than bit equality.
    np.testing.assert_allclose(np.asarray(_describe(net, x, att, jnp.asarray(1e-7))), plain, atol=1e-6, rtol=0)
    assert np.max(np.abs(np.asarray(_describe(net, x, att, jnp.asarray(0.5))) - plain)) > 1e-3


def test_uniform_attention_at_alpha_one_reweights_nothing(case):
    """A = 1 everywhere and alpha = 1 give w = 1: the plain softmax (this is what the log bias must reduce to)."""
    _, _, net, _, images, _ = case
    x = jnp.asarray(nhwc(images))
    ones = jnp.ones((2, 3, 4))
    np.testing.assert_allclose(_describe(net, x, ones, jnp.asarray(1.0)), _describe(net, x), atol=1e-6, rtol=0)


def test_alpha_sweep_equals_one_alpha_calls(case):
    _, _, net, _, images, attention = case
    feats = _features(net, jnp.asarray(nhwc(images)))
    att = jnp.asarray(attention.numpy())
    alphas = jnp.asarray([0.0, 0.4, 1.0])
    sweep = nnx.jit(lambda n, f, a, al: jax.vmap(lambda x: n.aggregate(f, a, x))(al))(net, feats, att, alphas)
    single = nnx.jit(lambda n, f, a, al: n.aggregate(f, a, al))
    for k in range(3):
        np.testing.assert_allclose(sweep[k], single(net, feats, att, alphas[k]), atol=1e-6, rtol=0)


def test_gradient_in_alpha_matches_float64_central_differences(case):
    """d/d alpha of <descriptor, r>: jax.grad (float32) against the torch reference's float64 central differences."""
    backbone, reference, net, _, images, attention = case
    r = np.random.default_rng(3).normal(size=(2, 512))
    head64 = make_torch_boq(torch.Generator().manual_seed(2), backbone=backbone).double().aggregator
    with torch.no_grad():
        feature_map = reference.backbone(images)

    def torch_score(alpha: float) -> float:
        with torch.no_grad():
            d, _ = head64(feature_map.double(), attention.double(), torch.tensor(alpha, dtype=torch.float64))
        return float((d.numpy() * r).sum())

    feats = CnnFeatures(maps=jnp.asarray(nhwc(feature_map)))
    att = jnp.asarray(attention.numpy())
    grad = nnx.jit(lambda n, a: jax.grad(lambda al: jnp.sum(n.aggregate(feats, att, al) * r))(a))
    for alpha in (0.3, 0.8):
        h = 1e-5
        expected = (torch_score(alpha + h) - torch_score(alpha - h)) / (2 * h)
        assert abs(expected) > 1e-3  # the gradient is not trivially zero
        np.testing.assert_allclose(float(grad(net, jnp.asarray(alpha))), expected, rtol=GRAD_RTOL, atol=1e-6)


# ------------------------------------------------------------------------------------ model directory and script


@pytest.mark.parametrize("backbone, size", [("dinov2", (322, 322)), ("resnet50", (384, 384))])
def test_preprocess_matches_vpr_methods_evaluation(backbone, size, tmp_path):
    """ToTensor, Normalize, then Resize(size, antialias=True) of the float tensor, on real JPEG files."""
    from PIL import Image
    from torchvision import transforms as T

    from attllm_jax.data.preprocess import preprocess_image
    from attllm_jax.models.boq import BoQSpec

    preprocess = BoQSpec.released(backbone).default_preprocess()
    reference = T.Compose(
        [
            T.ToTensor(),
            T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
            T.Resize(size=list(size), antialias=True),
        ]
    )
    pil_bilinear = T.Compose(
        [T.Resize(list(size)), T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]
    )
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(640, 480), (300, 500)]):
        path = tmp_path / f"img{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        with Image.open(path) as image:
            ours = preprocess_image(image, preprocess)
            expected = reference(image).permute(1, 2, 0).numpy()
            pil = pil_bilinear(image).permute(1, 2, 0).numpy()
        assert ours.shape == (*size, 3)
        # float32 sums in another order than torch's: measured 1.1e-5 on values up to 2.6
        np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)
        assert np.max(np.abs(pil - expected)) > 1e-3  # resizing the uint8 image instead would be measurably off


@pytest.mark.slow
def test_converter_script_and_load_without_torch(tmp_path):
    """converters/boq.py on a .safetensors file, then aj.load_model and its sweep, with torch blocked."""
    reference = _reference("dinov2")
    g = torch.Generator().manual_seed(4)
    images, attention = torch.randn(2, 3, 70, 98, generator=g), 2.0 * torch.rand(2, 3, 4, generator=g)
    # Upstream's heads are d / 64; the tiny reference DINOv2 (width 64) has 4, which the weights do not say.
    prelude = (
        "import dataclasses\n"
        "import attllm_jax.convert.boq as boq\n"
        "convert = boq.convert_state_dict\n"
        "boq.convert_state_dict = lambda s, f, n, o: convert(s, f, n, dataclasses.replace(o, backbone_num_heads=4))\n"
    )
    config, ours = convert_and_load_without_torch(
        tmp_path,
        "boq",
        reference.upstream_state_dict(),
        images,
        attention,
        ("--image_size=70,98",),
        source_name="dinov2_512.safetensors",
        prelude=prelude,
        outputs="np.concatenate([m(x)[None], m.aggregate_sweep(m.features(x), a, [0.0, 0.5])])",
    )
    assert config["family"] == "boq" and config["architecture"]["resnet_layers"] is None
    assert config["preprocess"]["size"] == [70, 98] and config["preprocess"]["stage"] == "tensor"
    with torch.no_grad():
        expected = reference(images).numpy()
        expected_att = reference(images, attention, 0.5).numpy()
    np.testing.assert_allclose(ours[0], expected, atol=DESC_ATOL, rtol=0)
    np.testing.assert_allclose(ours[1], expected, atol=DESC_ATOL, rtol=0)  # alpha 0 of the sweep: plain
    np.testing.assert_allclose(ours[2], expected_att, atol=DESC_ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------- strictness


def _state(backbone):
    return {k: v.numpy().copy() for k, v in _reference(backbone).upstream_state_dict().items()}


def test_missing_extra_and_misshapen_tensors_are_all_named():
    state = _state("dinov2")
    del state["aggregator.boqs.1.cross_attn.in_proj_bias"]
    state["aggregator.boqs.0.extra"] = np.zeros((3, 2), np.float32)
    state["aggregator.fc.bias"] = np.zeros((5,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(state, "boq", options=HEADS_4)
    message = str(info.value)
    assert "'aggregator.boqs.1.cross_attn.in_proj_bias'" in message
    assert "'aggregator.boqs.0.extra' [3, 2]" in message
    assert "aggregator.fc.bias" in message and "[5]" in message


def test_resnet_layer4_is_not_silently_dropped():
    """VPR-methods-evaluation's copy loads with strict=False; here an unexpected layer4 is an error."""
    state = _state("resnet50")
    state["backbone.net.7.0.conv1.weight"] = np.zeros((512, 1024, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"unused source tensor 'backbone\.net\.7\.0\.conv1\.weight'"):
        convert_state_dict(state, "boq")


def test_missing_backbone_is_named():
    state = {k: v for k, v in _state("resnet50").items() if not k.startswith("backbone.net.5.")}
    with pytest.raises(ConversionError, match=r"no ResNet blocks under backbone\.net\.5 \(layer2\)"):
        convert_state_dict(state, "boq")


def test_other_families_are_rejected_with_a_hint():
    megaloc_like = {"backbone.cls_token": np.zeros((1, 1, 64)), "aggregator.agg.dust_bin": np.zeros(())}
    with pytest.raises(ConversionError, match="not a BoQ checkpoint.*MegaLoc"):
        convert_state_dict(megaloc_like, "boq")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["dinov2", "resnet50"])
def test_full_size_boq_matches_torch(backbone):
    """The released architectures at their evaluation sizes (322x322 / 384x384), random weights."""
    reference = make_torch_boq(torch.Generator().manual_seed(5), **RELEASED_BOQ_ARCH[backbone])
    net, spec = convert_state_dict({k: v.numpy() for k, v in reference.upstream_state_dict().items()}, "boq")
    assert spec.descriptor_dim == {"dinov2": 12288, "resnet50": 16384}[backbone]
    assert spec.backbone == {"dinov2": "dinov2_vitb14", "resnet50": "resnet50"}[backbone]
    size = {"dinov2": 322, "resnet50": 384}[backbone]
    g = torch.Generator().manual_seed(6)
    images = torch.randn(1, 3, size, size, generator=g)
    attention = 2.0 * torch.rand(1, 16, 16, generator=g)
    with torch.no_grad():
        expected = reference(images).numpy()
        expected_att = reference(images, attention, 0.5).numpy()
    x = jnp.asarray(nhwc(images))
    np.testing.assert_allclose(_describe(net, x), expected, atol=DESC_ATOL, rtol=0)
    ours_att = _describe(net, x, jnp.asarray(attention.numpy()), jnp.asarray(0.5))
    np.testing.assert_allclose(ours_att, expected_att, atol=DESC_ATOL, rtol=0)
