"""The numeric precision a model runs at: ``"float32"`` (default), ``"tf32"`` or ``"bfloat16"``.

- ``float32``: float32 parameters and activations, and ``jax.lax.Precision.HIGHEST`` for every matrix product and
  convolution (through ``jax.default_matmul_precision("highest")`` while the model's functions are traced, so it
  reaches every dot and convolution of every family). On GPU and TPU, whose default float32 products are TF32 or
  bfloat16 passes, this is what keeps converted models at float32 round-off from their PyTorch release; on CPU
  it is what XLA does anyway.
- ``tf32``: float32 storage with the backend's default (fast) matmul precision (``"default"``): TF32 on recent
  NVIDIA GPUs, one bfloat16 pass on TPUs, exact float32 on CPU (there ``tf32`` equals ``float32`` bit for bit).
- ``bfloat16``: the backbone's linear and convolution layers hold bfloat16 kernels and biases and take bfloat16
  inputs (one bfloat16 pass), with float32 results (``preferred_element_type``); the DINOv2 attention products
  take bfloat16 queries, keys and values. Everything else stays float32:
  LayerNorm / BatchNorm statistics and outputs, the residual sums, the attention logits and softmax, the whole
  aggregation head (GeM powers and roots, SALAD's Sinkhorn iterations, BoQ's blocks, the attention-map blend) and
  the final L2 norms. The backbone's output is cast to float32 before aggregation, so :meth:`VPRModel.features`
  returns float32 pytrees at every precision.

The precision is part of a model's identity: descriptor stores and results.json record it
(:func:`attllm_jax.evaluation.extract.database_store_key`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

PRECISIONS = ("float32", "tf32", "bfloat16")
DEFAULT_PRECISION = "float32"
# The jax_default_matmul_precision each precision traces the model under.
MATMUL_PRECISION = {"float32": "highest", "tf32": "default", "bfloat16": "default"}


def validate_precision(precision: str, name: str = "precision") -> str:
    """Returns ``precision`` if it is one of :data:`PRECISIONS`.

    Raises:
        ValueError: anything else, naming the value and the choices.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    return precision


def matmul_precision(precision: str):
    """The ``jax.default_matmul_precision`` context a model of ``precision`` is traced under."""
    return jax.default_matmul_precision(MATMUL_PRECISION[validate_precision(precision)])


def backbone_dtype(precision: str) -> jnp.dtype:
    """The compute dtype of the backbone's linear and convolution layers (bfloat16 or float32)."""
    return jnp.dtype(jnp.bfloat16 if validate_precision(precision) == "bfloat16" else jnp.float32)


def pointwise_conv(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    preferred_element_type=None,
    **kwargs,
):
    """``jax.lax.conv_general_dilated`` (the signature :class:`flax.nnx.Conv` calls) with 1x1 kernels as a product.

    A channels-last ``[B, H, W, C]`` input with a ``[1, 1, C, O]`` kernel, no padding, dilation or groups is strided
    (``x[:, ::s, ::s]``, the same output grid as the convolution) and multiplied by the ``[C, O]`` kernel; anything
    else goes to ``conv_general_dilated`` unchanged. On XLA:CPU a pointwise convolution runs as a generic
    convolution at about a quarter of the speed of the same product (25 vs 102 GFLOP/s float32, 26 vs 222 bfloat16
    for ``[4, 64, 86, 1024] x [1024, 256]`` on the development VM); used for the bfloat16 backbones only, so the
    float32 models keep their exact operations.
    """
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")) if lhs.ndim == 4 else None
    unpadded = padding == "VALID" or (not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding))
    if (
        lhs.ndim == 4
        and rhs.shape[:2] == (1, 1)
        and unpadded
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))
        and (dimension_numbers is None or dimension_numbers == nhwc)
        and not kwargs.get("out_sharding")
    ):
        strided = lhs[:, :: window_strides[0], :: window_strides[1], :]
        return jnp.einsum(
            "bhwc,co->bhwo", strided, rhs[0, 0], precision=precision, preferred_element_type=preferred_element_type
        )
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )


def apply_precision(net: nnx.Module, precision: str) -> nnx.Module:
    """``net`` set up for ``precision``: a copy whose backbone computes in bfloat16, or ``net`` itself.

    For ``"bfloat16"`` every :class:`flax.nnx.Linear` and :class:`flax.nnx.Conv` under ``net.backbone`` gets
    ``dtype=bfloat16`` and its kernel and bias are stored in bfloat16 (a second call changes nothing); the
    normalization layers, other parameters and the aggregation head stay float32; 1x1 convolutions run as matrix
    products (:func:`pointwise_conv`). ``net`` itself is not changed.

    Args:
        net: a family's network (every family has a ``backbone`` attribute).
        precision: one of :data:`PRECISIONS`.
    """
    if validate_precision(precision) != "bfloat16":
        return net
    net = nnx.clone(net)  # new Variables (nnx.merge of a split would share them): the caller's network keeps float32
    for _, module in nnx.iter_graph(net.backbone):
        if isinstance(module, (nnx.Linear, nnx.Conv)):
            module.dtype = jnp.bfloat16
            # bfloat16 operands, float32 results: XLA:CPU's bfloat16 x bfloat16 -> bfloat16 product runs below the
            # float32 one (74 vs 104 GFLOP/s), bfloat16 -> float32 at twice it (210); accumulation is float32 anyway
            module.preferred_element_type = jnp.float32
            if isinstance(module, nnx.Conv):
                module.conv_general_dilated = pointwise_conv
            for name in ("kernel", "bias"):
                variable = getattr(module, name, None)
                if variable is not None:
                    variable.set_value(variable.get_value().astype(jnp.bfloat16))
    return net


def features_as_float32(feats):
    """Every floating leaf of a :class:`~attllm_jax.models.features.Features` pytree cast to float32."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, feats)


def runtime_summary(precision: str | None = None) -> str:
    """One line: backend, device count and kinds, and ``precision`` with the matmul precision it uses.

    E.g. ``"backend cpu: 1 device (cpu), precision float32 (matmul highest)"``; the global
    ``jax_default_matmul_precision`` is named when ``precision`` is None.
    """
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    line = (
        f"backend {jax.default_backend()}: {len(devices)} device{'s' if len(devices) != 1 else ''} ({', '.join(kinds)})"
    )
    if jax.process_count() > 1:
        line += f", {jax.process_count()} processes"
    if precision is None:
        return f"{line}, default matmul precision {jax.config.jax_default_matmul_precision or 'backend default'}"
    return f"{line}, precision {precision} (matmul {MATMUL_PRECISION[validate_precision(precision)]})"


def backend_problem() -> str | None:
    """Whether JAX's default backend starts: None if it does, else one line naming ``JAX_PLATFORMS`` and the fix.

    ``JAX_PLATFORMS=tpu`` without a TPU raises JAX's RuntimeError ("Unable to initialize backend 'tpu'"),
    ``JAX_PLATFORMS=cuda`` without the CUDA plugin a bare AssertionError; both become this line.
    """
    import os

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as error:
        asked = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME")
        reason = str(error).splitlines()[0] if str(error).strip() else "no such backend is installed"
        reason = reason.split(" (set JAX_PLATFORMS")[0]
        what = f"JAX_PLATFORMS={asked}" if asked else "JAX's default backend"
        fix = (
            "unset JAX_PLATFORMS (or set it to cpu), or install the accelerator's jax build "
            '(pip install -e ".[cuda]" or ".[tpu]"); python -m experiments.doctor shows what JAX finds'
        )
        return f"{what}: the backend cannot start ({reason}): {fix}"
    return None
