"""A PyTorch ImAge reference for the parity tests (test-only; never imported by the library).

Written from Lu-Feng/ImAge ``network.py`` (``VPRmodel.forward`` without an explicit aggregator) and
``backbone/vision_transformer.py`` (not copied): transformers' DINOv2 with registers, its position-embedding resize
replaced by upstream's original one (offset 0.1, no antialias, which ``vit_base(num_register_tokens=4)`` keeps),
its embeddings (class token, position embeddings, registers) and its own layers for the first ``P`` blocks; then the
aggregation tokens prepended, the remaining blocks, the final LayerNorm, the first ``T`` tokens flattened, L2.

The blocks after the insertion run as transformers' layers on the plain path. With attention they run as a
functional block from the hub-named weights (``attn.qkv``, ``ls1.gamma``, ...), whose aggregation-token rows get
``log(max(w_i, 1e-6))`` added to their logits to the patch tokens, ``w = nu + alpha (A - nu)`` with ``nu`` the
head- and query-mean of the plain weights to the patches, divided by its mean (A clamped to [0, 2]).

``upstream_state_dict()`` has the release's keys (``module.backbone.<hub key>`` with ``mask_token``,
``module.learnable_aggregation_tokens``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.torch_baselines import hf_dinov2_to_hub, make_hf_dinov2, patch_upstream_interpolation, randomize_

ALPHA_OFF = 1e-6
TOKEN_WEIGHT_EPS = 1e-6


def _layer(layer, x):
    out = layer(x)
    return out[0] if isinstance(out, tuple) else out


class TorchImAge(nn.Module):
    def __init__(self, backbone: nn.Module, num_tokens: int, insertion: int, num_heads: int):
        super().__init__()
        self.backbone = backbone
        self.insertion, self.num_heads = insertion, num_heads
        dim = backbone.config.hidden_size
        self.learnable_aggregation_tokens = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.num_registers = backbone.config.num_register_tokens

    def hub(self) -> dict[str, torch.Tensor]:
        return hf_dinov2_to_hub(self.backbone.state_dict())

    def _biased_block(self, sd, i, x, num_agg, patch_start, attention, alpha):
        p = f"blocks.{i}."
        b, t, c = x.shape
        hd = c // self.num_heads
        h = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
        qkv = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, t, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        logits = (q * hd**-0.5) @ k.transpose(-2, -1)  # [B, H, T, T]
        plain = logits[:, :, :num_agg].softmax(-1)[..., patch_start:]
        mass = plain.mean(dim=(1, 2))
        nu = mass / mass.mean(dim=1, keepdim=True)
        w = nu + alpha[:, None] * (attention.clamp(0.0, 2.0) - nu)
        bias = torch.zeros(b, t, dtype=x.dtype)
        bias[:, patch_start:] = torch.log(w.clamp(min=TOKEN_WEIGHT_EPS))
        bias = torch.where((alpha <= ALPHA_OFF)[:, None], torch.zeros_like(bias), bias)
        logits = logits.clone()
        logits[:, :, :num_agg] = logits[:, :, :num_agg] + bias[:, None, None, :]
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        x = x + sd[p + "ls1.gamma"] * F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
        mlp = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"])
        return x + sd[p + "ls2.gamma"] * (mlp + sd[p + "mlp.fc2.bias"])

    def forward(self, images, attention=None, alpha=0.0):
        b, _, height, width = images.shape
        x = self.backbone.embeddings(images)
        layers = self.backbone.encoder.layer
        for i in range(self.insertion):
            x = _layer(layers[i], x)
        num_agg = self.learnable_aggregation_tokens.shape[1]
        x = torch.cat([self.learnable_aggregation_tokens.expand(b, -1, -1), x], dim=1)
        patch_start = num_agg + 1 + self.num_registers
        if attention is not None:
            grid = (height // 14, width // 14)
            attention = F.interpolate(attention[:, None], size=grid, mode="bilinear", align_corners=False)
            attention = attention.reshape(b, -1)
            alpha = torch.as_tensor(alpha, dtype=x.dtype).expand(b)
            sd = self.hub()
        for i in range(self.insertion, len(layers)):
            if attention is None:
                x = _layer(layers[i], x)
            else:
                x = self._biased_block(sd, i, x, num_agg, patch_start, attention, alpha)
        x = self.backbone.layernorm(x)
        return F.normalize(x[:, :num_agg].flatten(1), p=2, dim=-1)

    def upstream_state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"module.backbone.{k}": v for k, v in self.hub().items()}
        out["module.learnable_aggregation_tokens"] = self.learnable_aggregation_tokens
        return out


def make_torch_image4vpr(
    generator: torch.Generator,
    embed_dim: int = 64,
    depth: int = 3,
    num_heads: int = 4,
    image_size: int = 56,
    num_tokens: int = 3,
    insertion: int = 2,
) -> TorchImAge:
    """A seeded random reference in eval mode (small by default: the tokens enter before block 2 of 3; the released
    architecture is ``embed_dim=768, depth=12, num_heads=12, image_size=518, num_tokens=8, insertion=8``)."""
    backbone = make_hf_dinov2(
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, image_size=image_size, num_register_tokens=4
    )
    patch_upstream_interpolation(backbone, offset=0.1, antialias=False)
    model = TorchImAge(backbone, num_tokens, insertion, num_heads)
    randomize_(model, generator)
    with torch.no_grad():
        model.learnable_aggregation_tokens.copy_(0.5 * torch.randn(1, num_tokens, embed_dim, generator=generator))
    return model.eval()
