"""Pure jax.numpy operations: no Flax, no I/O. Every public op is jittable and vmappable.

Conventions shared by all ops: arrays are batch-first and channels-last; computation runs in float32 or
wider (bfloat16 inputs are upcast) and results are returned in that dtype; shape errors and concrete
``alpha`` values outside ``[0, 1]`` raise ``ValueError`` naming the argument (checked at trace time).
"""

from attllm_jax.ops.attention_maps import grid_attention_map, rbf_attention_map, resize_attention
from attllm_jax.ops.checks import validate_alpha
from attllm_jax.ops.gem import BLENDS, gem, modulated_gem
from attllm_jax.ops.normalize import l2_normalize
from attllm_jax.ops.resize import bicubic_resize_scale_factor
from attllm_jax.ops.sinkhorn import log_sinkhorn_assignment, salad_pool

__all__ = [
    "BLENDS",
    "bicubic_resize_scale_factor",
    "gem",
    "grid_attention_map",
    "l2_normalize",
    "log_sinkhorn_assignment",
    "modulated_gem",
    "rbf_attention_map",
    "resize_attention",
    "salad_pool",
    "validate_alpha",
]
