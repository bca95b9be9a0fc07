"""``VPRModel``: a converted network and its :class:`~attllm_jax.models.spec.ModelSpec`, with one jitted function
per input shape.

The network (any family) is split once into a static graph definition and its state; every public method is a
``jax.jit`` of a pure function of (state, inputs), so a repeated input shape never recompiles. Every family's
network has the same interface (``features(images) -> Features``, ``aggregate(features, attention, alpha)``, see
:mod:`attllm_jax.models.features`), so nothing here depends on the family.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from attllm_jax import ops
from attllm_jax.data.preprocess import output_size, preprocess_image
from attllm_jax.models.features import Features
from attllm_jax.models.precision import (
    DEFAULT_PRECISION,
    apply_precision,
    features_as_float32,
    matmul_precision,
    validate_precision,
)
from attllm_jax.models.spec import ModelSpec


class DescriptorModel(Protocol):
    """What the pipeline, the extraction, the tuning and the severity sweep need of a model (``VPRModel`` and any
    wrapper of it, e.g. the tests' slow-preprocess model)."""

    spec: ModelSpec
    precision: str
    net: nnx.Module  # read for the weights digest and the tuning's blend switch

    def preprocess(self, pil_image: Image.Image, image_size: int | Sequence[int] | None = None) -> np.ndarray: ...

    def features(self, images: jax.Array | np.ndarray) -> Features: ...

    def aggregate(
        self, feats: Features, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array: ...

    def aggregate_sweep(self, feats: Features, attention: jax.Array, alphas: Sequence[float]) -> jax.Array: ...

    def replicate(self, mesh: Mesh) -> None: ...


class VPRModel:
    """A network and its spec, with jitted inference.

    Attributes:
        spec: the :class:`~attllm_jax.models.spec.ModelSpec` (family, architecture, preprocessing, provenance).
        precision: ``"float32"``, ``"tf32"`` or ``"bfloat16"`` (see :mod:`attllm_jax.models.precision`).
        net: the NNX network (kept for inspection; inference uses the split state). Under ``"bfloat16"`` a copy of
            the given network whose backbone holds bfloat16 kernels.
        trace_counts: how many times each method's pure function was traced (a retrace means a compile).
    """

    def __init__(self, net: nnx.Module, spec: ModelSpec, precision: str = DEFAULT_PRECISION):
        """Wraps ``net`` (with ``features``/``aggregate``/``__call__``) described by ``spec``, run at ``precision``.

        Raises:
            TypeError: ``spec`` is not a ModelSpec.
            ValueError: an unknown ``precision`` (the message lists the choices).
        """
        if not isinstance(spec, ModelSpec):
            raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
        self.precision = validate_precision(precision)
        self.spec = spec
        self.net = apply_precision(net, self.precision)
        self._graphdef, self._state = nnx.split(self.net)
        self.trace_counts: collections.Counter = collections.Counter()
        self._jit_call = jax.jit(self._pure_call)
        self._jit_features = jax.jit(self._pure_features)
        self._jit_aggregate = jax.jit(self._pure_aggregate)
        self._jit_sweep = jax.jit(self._pure_sweep)
        self._replicated_on: Mesh | None = None

    def __repr__(self) -> str:
        spec = self.spec
        return (
            f"VPRModel(family={spec.family!r}, backbone={spec.backbone!r}, descriptor_dim={spec.descriptor_dim}, "
            f"precision={self.precision!r})"
        )

    # Pure functions of (state, inputs); the Python body runs only when tracing, under the precision's
    # jax.default_matmul_precision, so every dot and convolution of the compiled function carries it.
    def _merge(self, state):
        return nnx.merge(self._graphdef, state)

    def _pure_call(self, state, images, attention, alpha):
        self.trace_counts["__call__"] += 1
        with matmul_precision(self.precision):
            net = self._merge(state)
            return net.aggregate(features_as_float32(net.features(images)), attention, alpha)

    def _pure_features(self, state, images):
        self.trace_counts["features"] += 1
        with matmul_precision(self.precision):
            return features_as_float32(self._merge(state).features(images))

    def _pure_aggregate(self, state, feats, attention, alpha):
        self.trace_counts["aggregate"] += 1
        with matmul_precision(self.precision):
            return self._merge(state).aggregate(feats, attention, alpha)

    def _pure_sweep(self, state, feats, attention, alphas):
        self.trace_counts["aggregate_sweep"] += 1
        with matmul_precision(self.precision):
            net = self._merge(state)
            return jax.vmap(lambda a: net.aggregate(feats, attention, a))(alphas)

    def preprocess(self, pil_image: Image.Image, image_size: int | Sequence[int] | None = None) -> np.ndarray:
        """The model's evaluation transform: ``PIL image -> [H, W, 3]`` float32 (see :func:`preprocess_image`).

        Args:
            pil_image: the image.
            image_size: optional override of the spec's size (int: shorter side; ``(H, W)``: exact).
        """
        return preprocess_image(pil_image, self.spec.preprocess, image_size)

    def output_size(self, width: int, height: int, image_size: int | Sequence[int] | None = None) -> tuple[int, int]:
        """The ``(width, height)`` :meth:`preprocess` gives a ``width x height`` image, computed without decoding."""
        return output_size(width, height, self.spec.preprocess, image_size)

    def __call__(
        self, images: jax.Array | np.ndarray, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """Descriptors ``[B, D]`` (L2-normalized) of images ``[B, H, W, 3]``.

        Args:
            images: preprocessed images ``[B, H, W, 3]``.
            attention: optional maps ``[B, h', w']``, resized to the feature grid.
            alpha: blend factor in [0, 1], scalar or ``[B]``; ignored without attention.
        """
        images = _check_images(images)
        return self._jit_call(self._state, images, *_attention_args(attention, alpha))

    def features(self, images: jax.Array | np.ndarray) -> Features:
        """The backbone output of ``[B, H, W, 3]`` images: the family's :class:`Features` pytree."""
        return self._jit_features(self._state, _check_images(images))

    def aggregate(
        self, feats: Features, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """Descriptors ``[B, D]`` from :meth:`features` output, optionally attention-modulated."""
        return self._jit_aggregate(self._state, _check_features(feats), *_attention_args(attention, alpha))

    def aggregate_sweep(self, feats: Features, attention: jax.Array, alphas: Sequence[float]) -> jax.Array:
        """Descriptors for a whole alpha grid in one jitted, vmapped call.

        Args:
            feats: output of :meth:`features`.
            attention: maps ``[B, h', w']``.
            alphas: ``[K]`` blend factors in [0, 1].

        Returns:
            ``[K, B, D]``: row k equals ``aggregate(feats, attention, alphas[k])``.
        """
        alphas = ops.validate_alpha(alphas, "alphas")
        if alphas.ndim != 1:
            raise ValueError(f"alphas must be a 1-D grid [K], got shape {alphas.shape}")
        return self._jit_sweep(self._state, _check_features(feats), jnp.asarray(attention, jnp.float32), alphas)

    def replicate(self, mesh: Mesh) -> None:
        """Places the parameters and statistics replicated on every device of ``mesh``, once per mesh.

        Without it the parameters stay on device 0 and every sharded call copies them to the other devices. The
        split state the jitted functions receive holds the same NNX variables as ``net``, so updating ``net``
        reaches them (``tests/test_eval_devices.py`` records the arrays the jitted forward receives).
        """
        if mesh.devices.size == 1 or self._replicated_on == mesh:
            return
        state = nnx.state(self.net)
        nnx.update(self.net, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
        self._replicated_on = mesh

    def feature_grid(self, feats: Features) -> tuple[int, int]:
        """The ``(h, w)`` grid of :meth:`features` output, the resolution attention maps are resized to."""
        return feats.grid


def _check_features(feats) -> Features:
    if not isinstance(feats, Features):
        raise ValueError(f"feats must be the Features pytree that model.features() returns, got {type(feats).__name__}")
    return feats


def _check_images(images) -> jax.Array:
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape [B, H, W, 3], got {images.shape}")
    return images.astype(jnp.float32)


def _attention_args(attention, alpha) -> tuple[jax.Array | None, jax.Array]:
    alpha = ops.validate_alpha(alpha)
    if attention is not None:
        attention = jnp.asarray(attention, jnp.float32)
        if attention.ndim != 3:
            raise ValueError(f"attention must have shape [B, h, w], got {attention.shape}")
    return attention, alpha
