"""DINOv2 in Flax NNX against transformers' PyTorch DINOv2 with upstream (facebookresearch/dinov2) semantics.

The reference is transformers' ``Dinov2Model`` with its position-embedding interpolation replaced by upstream's
(``scale_factor=((h0 + 0.1) / M, (w0 + 0.1) / M)``), or ``Dinov2WithRegistersModel`` whose own interpolation
already equals upstream's register models' (``size=``, antialias). Its transformers keys are mapped to torch.hub
keys in :func:`benchmarks.torch_baselines.hf_dinov2_to_hub` and converted by the production converter.
Tolerances (float32, highest matmul precision): tokens ``atol 1e-4 + rtol 1e-5``; resizes ``1e-5``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from torch_helpers import nhwc

from attllm_jax.models.dinov2 import (
    DINOV2_PRESETS,
    DinoV2Config,
    DinoVisionTransformer,
    dinov2_config,
    swiglu_hidden_dim,
)
from attllm_jax.ops.resize import antialiased_bicubic_matrix

TOKEN_ATOL, TOKEN_RTOL = 1e-4, 1e-5
RESIZE_TOL = 1e-5


# ----------------------------------------------------------------------------------------------- position embeddings


@pytest.mark.torch
@pytest.mark.parametrize(
    "in_size, out_size", [((37, 37), (23, 23)), ((37, 37), (16, 22)), ((4, 4), (3, 7)), ((5, 5), (9, 2))]
)
def test_antialiased_bicubic_matrix_matches_torch(in_size, out_size):
    torch = pytest.importorskip("torch")
    from attllm_jax.ops.resize import apply_separable

    x = np.random.default_rng(0).normal(size=(1, *in_size, 6)).astype(np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(x).permute(0, 3, 1, 2), size=out_size, mode="bicubic", antialias=True, align_corners=False
    )
    rows = antialiased_bicubic_matrix(in_size[0], out_size[0])
    cols = antialiased_bicubic_matrix(in_size[1], out_size[1])
    np.testing.assert_allclose(rows.sum(1), 1.0, atol=1e-12)
    out = apply_separable(jnp.asarray(x), rows, cols)
    np.testing.assert_allclose(out, nhwc(expected), rtol=RESIZE_TOL, atol=RESIZE_TOL)


def _small_vit(grid: int, registers: int = 0, offset: float = 0.1, antialias: bool = False) -> DinoVisionTransformer:
    config = DinoV2Config(
        embed_dim=16,
        depth=1,
        num_heads=2,
        ffn_hidden_dim=32,
        pos_embed_grid=grid,
        num_register_tokens=registers,
        interpolate_offset=offset,
        interpolate_antialias=antialias,
    )
    return _random_module(lambda: DinoVisionTransformer(config, rngs=nnx.Rngs(0)))


def _random_module(factory, seed: int = 0):
    """Builds a module abstractly and fills it with Gaussian values (eager NNX initialization is slow on CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(factory))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda v: jnp.asarray(0.1 * rng.normal(size=v.shape).astype(v.dtype)), state)
    return nnx.merge(graphdef, state)


@pytest.mark.torch
@pytest.mark.parametrize("offset, antialias", [(0.1, False), (0.0, True)])
@pytest.mark.parametrize("grid_hw", [(23, 23), (16, 22), (45, 30), (37, 37)])
def test_pos_embed_interpolation_matches_upstream(offset, antialias, grid_hw):
    """37x37 stored grid (the released models) resized as upstream; 37x37 itself is returned unchanged."""
    torch = pytest.importorskip("torch")
    from benchmarks.torch_baselines import upstream_interpolate_pos_encoding

    vit = _small_vit(37, offset=offset, antialias=antialias)
    pos = np.random.default_rng(1).normal(size=(1, 1 + 37 * 37, 16)).astype(np.float32)
    vit.pos_embed.set_value(jnp.asarray(pos))
    h0, w0 = grid_hw
    expected = upstream_interpolate_pos_encoding(torch.from_numpy(pos), h0, w0, offset=offset, antialias=antialias)
    out = vit.interpolate_pos_encoding(h0, w0)
    assert out.shape == (1, 1 + h0 * w0, 16)
    np.testing.assert_allclose(out, expected.numpy(), rtol=RESIZE_TOL, atol=RESIZE_TOL)


def test_pos_embed_interpolation_is_not_a_plain_resize():
    """The 0.1 offset matters: the result differs from a size-based bicubic resize (this test can fail)."""
    from attllm_jax import ops

    vit = _small_vit(37)
    pos = vit.pos_embed[...]
    ours = vit.interpolate_pos_encoding(23, 23)[:, 1:].reshape(1, 23, 23, -1)
    size_based = ops.bicubic_resize_scale_factor(pos[:, 1:].reshape(1, 37, 37, -1), (23 / 37, 23 / 37))
    assert float(jnp.max(jnp.abs(ours - size_based))) > 1e-4


# ----------------------------------------------------------------------------------------------------- full parity


_VARIANTS = {"plain": {}, "registers": {"num_register_tokens": 2}, "swiglu": {"swiglu": True}}


@pytest.fixture(scope="module")
def converted():
    """Per variant: (transformers reference, our converted module), built once."""
    torch = pytest.importorskip("torch")
    from attllm_jax.convert.salad import convert_dinov2_state_dict
    from benchmarks.torch_baselines import hf_dinov2_to_hub, make_hf_dinov2, randomize_

    cache = {}

    def get(variant):
        if variant not in cache:
            model = make_hf_dinov2(embed_dim=64, depth=2, num_heads=4, image_size=56, **_VARIANTS[variant])
            randomize_(model, torch.Generator().manual_seed(7))
            hub = {k: v.numpy() for k, v in hf_dinov2_to_hub(model.state_dict()).items()}
            cache[variant] = model, convert_dinov2_state_dict(hub, num_heads=4)
        return cache[variant]

    return get


def _torch_intermediates(model, images, torch):
    """Embedding output, each block's output and the final normalized tokens of the transformers model."""
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, i, o: outputs.append(o)) for layer in model.encoder.layer]
    embedded = []
    hooks.append(model.embeddings.register_forward_hook(lambda m, i, o: embedded.append(o)))
    with torch.no_grad():
        final = model(pixel_values=images).last_hidden_state
    for h in hooks:
        h.remove()
    blocks = [o[0] if isinstance(o, tuple) else o for o in outputs]
    return embedded[0].numpy(), [b.numpy() for b in blocks], final.numpy()


def _our_intermediates(vit, x):
    tokens = [vit.prepare_tokens(x)]
    for block in vit.blocks:
        tokens.append(block(tokens[-1]))
    return tokens, vit(x)


@pytest.mark.torch
@pytest.mark.parametrize(
    "variant, image_hw, heads_per_chunk",
    [
        ("plain", (70, 98), None),  # 5x7 grid: interpolated from the stored 4x4
        ("plain", (56, 56), None),  # the stored 4x4 grid: no interpolation
        ("plain", (42, 28), None),  # 3x2: downsampled
        ("registers", (70, 98), None),  # antialiased size-based interpolation, registers after the class token
        ("registers", (42, 28), None),
        ("swiglu", (70, 98), None),
        ("plain", (70, 98), 3),  # CPU attention in groups of 3 of the 2 x 4 (image, head) pairs (a remainder of 2)
        ("registers", (42, 28), 1),
    ],
)
def test_dinov2_matches_torch_token_by_token(converted, monkeypatch, variant, image_hw, heads_per_chunk):
    """Tokens after embedding, after every block and after the final norm."""
    torch = pytest.importorskip("torch")
    from attllm_jax.models import dinov2

    if heads_per_chunk is not None:
        tokens = 1 + (2 if variant == "registers" else 0) + (image_hw[0] // 14) * (image_hw[1] // 14)
        monkeypatch.setattr(dinov2, "CPU_ATTENTION_CHUNK_BYTES", heads_per_chunk * tokens * tokens * 4)
    model, vit = converted(variant)
    assert vit.config.num_register_tokens == (2 if variant == "registers" else 0)
    assert vit.config.ffn_layer == ("swiglu" if variant == "swiglu" else "mlp")
    images = torch.randn(2, 3, *image_hw, generator=torch.Generator().manual_seed(3))
    embedded, blocks, final = _torch_intermediates(model, images, torch)

    tokens, out = nnx.jit(_our_intermediates)(vit, jnp.asarray(nhwc(images)))
    np.testing.assert_allclose(tokens[0], embedded, rtol=TOKEN_RTOL, atol=TOKEN_ATOL)
    for ours, expected in zip(tokens[1:], blocks, strict=True):
        np.testing.assert_allclose(ours, expected, rtol=TOKEN_RTOL, atol=TOKEN_ATOL)
    r = vit.config.num_register_tokens
    h0, w0 = image_hw[0] // 14, image_hw[1] // 14
    np.testing.assert_allclose(out["cls"], final[:, 0], rtol=TOKEN_RTOL, atol=TOKEN_ATOL)
    np.testing.assert_allclose(out["registers"], final[:, 1 : 1 + r], rtol=TOKEN_RTOL, atol=TOKEN_ATOL)
    np.testing.assert_allclose(
        out["patches"], final[:, 1 + r :].reshape(2, h0, w0, -1), rtol=TOKEN_RTOL, atol=TOKEN_ATOL
    )


# ------------------------------------------------------------------------------------------- presets and errors


def test_presets_match_the_released_architectures():
    vitb = dinov2_config("dinov2_vitb14")
    assert (vitb.embed_dim, vitb.depth, vitb.num_heads, vitb.ffn_hidden_dim, vitb.pos_embed_grid) == (
        768,
        12,
        12,
        3072,
        37,
    )
    vitg = dinov2_config("dinov2_vitg14")
    assert (vitg.embed_dim, vitg.depth, vitg.num_heads, vitg.ffn_layer) == (1536, 40, 24, "swiglu")
    assert vitg.ffn_hidden_dim == swiglu_hidden_dim(1536) == 4096  # torch.hub w12 is [8192, 1536]
    reg = dinov2_config("dinov2_vits14_reg")
    assert (reg.num_register_tokens, reg.interpolate_offset, reg.interpolate_antialias) == (4, 0.0, True)
    assert len(DINOV2_PRESETS) == 8
    with pytest.raises(ValueError, match="dinov2_vitb14"):
        dinov2_config("vit_b")


def test_full_size_vitb14_shapes_at_322():
    vit = nnx.eval_shape(lambda: DinoVisionTransformer(dinov2_config("dinov2_vitb14"), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(vit)
    out = jax.eval_shape(
        lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct((2, 322, 322, 3), jnp.float32)
    )
    assert out["cls"].shape == (2, 768)
    assert out["patches"].shape == (2, 23, 23, 768)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(state))
    assert n_params == 86_580_480 - 768  # torch.hub dinov2_vitb14's count, less its unused mask_token [1, 768]


def test_image_size_not_divisible_by_patch_raises():
    vit = _small_vit(4)
    with pytest.raises(ValueError, match="70x100"):
        vit(jnp.zeros((1, 70, 100, 3)))


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="num_heads"):
        DinoV2Config(embed_dim=64, num_heads=5)
    with pytest.raises(ValueError, match="ffn_layer"):
        DinoV2Config(ffn_layer="geglu")


@pytest.mark.parametrize("chunk_heads", [1, 3, 100])
def test_chunked_attention_equals_a_numpy_softmax(monkeypatch, chunk_heads):
    from attllm_jax.models import dinov2

    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 3, 10, 4)).astype(np.float32) for _ in range(3))
    logits = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = np.einsum("bhqk,bhkd->bhqd", weights / weights.sum(-1, keepdims=True), v)
    monkeypatch.setattr(dinov2, "CPU_ATTENTION_CHUNK_BYTES", chunk_heads * 10 * 10 * 4)
    out = jax.jit(dinov2.multi_head_attention)(q, k, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    if chunk_heads < 6:
        assert "while" in jax.jit(dinov2.multi_head_attention).lower(q, k, v).as_text()  # the grouped path ran
