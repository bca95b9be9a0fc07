"""``VPRModel``: a converted network plus its evaluation transform, with one jitted function per input shape.

The network (any family: CosPlace / EigenPlaces :class:`GeoLocalizationNet`, SALAD) is split once into a static
graph definition and its state; every public method is a ``jax.jit`` of a pure function of (state, inputs), so a
repeated input shape never recompiles.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from attllm_jax import ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("shorter_side", "exact")
_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


def default_preprocess_config(family: str, size: int | Sequence[int] | None = None) -> dict:
    """Each family's evaluation transform, written into converted configs and used when one has none.

    CosPlace / EigenPlaces resize the shorter side to 512; SALAD resizes to 322x322. Both use PIL bilinear
    (which antialiases when downscaling) and ImageNet normalization.

    Args:
        family: "cosplace", "eigenplaces" or "salad".
        size: optional override: the shorter side (CNN families) or ``(height, width)`` (SALAD).
    """
    if family == "salad":
        resize, size = "exact", [int(s) for s in (size or (322, 322))]
    else:
        resize, size = "shorter_side", int(size or 512)
    return {
        "resize": resize,
        "size": size,
        "interpolation": "bilinear",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output ``(width, height)``: shorter side ``size``, longer side floored."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess_image(image: Image.Image, config: dict, image_size: int | Sequence[int] | None = None) -> np.ndarray:
    """Applies an evaluation transform to one PIL image.

    Args:
        image: any PIL image (converted to RGB).
        config: a preprocess dict (``resize`` "shorter_side" or "exact", ``size``, ``interpolation``, ``mean``,
            ``std``), see :func:`default_preprocess_config`.
        image_size: override: an int resizes the shorter side to it, ``(height, width)`` resizes exactly.

    Returns:
        ``[H, W, 3]`` float32, scaled to [0, 1] then normalized with ``mean``/``std``.

    Raises:
        ValueError: a malformed config or ``image_size``.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"preprocess expects a PIL image, got {type(image).__name__}")
    resize, size = config.get("resize"), config.get("size")
    if image_size is not None:
        resize, size = ("shorter_side", image_size) if np.ndim(image_size) == 0 else ("exact", image_size)
    interpolation = config.get("interpolation", "bilinear")
    if resize not in RESIZE_MODES or interpolation not in _PIL_FILTERS:
        raise ValueError(
            f"bad preprocess config resize={resize!r} interpolation={interpolation!r}; "
            f"valid resize: {RESIZE_MODES}, interpolation: {tuple(_PIL_FILTERS)}"
        )
    image = image.convert("RGB")
    if resize == "shorter_side":
        if int(size) <= 0:
            raise ValueError(f"image_size must be positive, got {size!r}")
        out_size = shorter_side_size(image.width, image.height, int(size))
    else:
        if len(size) != 2 or min(int(s) for s in size) <= 0:
            raise ValueError(f"image_size must be an int or a positive (height, width) pair, got {size!r}")
        out_size = (int(size[1]), int(size[0]))
    if out_size != image.size:
        image = image.resize(out_size, _PIL_FILTERS[interpolation])
    x = np.asarray(image, dtype=np.float32) / 255.0
    mean = np.asarray(config.get("mean", IMAGENET_MEAN), np.float32)
    std = np.asarray(config.get("std", IMAGENET_STD), np.float32)
    return (x - mean) / std


class VPRModel:
    """A network and its config, with jitted inference.

    Attributes:
        config: the converter's config dict (family, backbone, descriptor_dim, image_size, preprocess, ...).
        net: the NNX network (kept for inspection; inference uses the split state).
        trace_counts: how many times each method's pure function was traced (a retrace means a compile).
    """

    def __init__(self, net: nnx.Module, config: dict):
        """Wraps ``net`` (with ``features``/``aggregate``/``__call__``) described by ``config``."""
        self.config = dict(config)
        self.net = net
        self._graphdef, self._state = nnx.split(net)
        self.trace_counts: collections.Counter = collections.Counter()
        self._jit_call = jax.jit(self._pure_call)
        self._jit_features = jax.jit(self._pure_features)
        self._jit_aggregate = jax.jit(self._pure_aggregate)
        self._jit_sweep = jax.jit(self._pure_sweep)

    def __repr__(self) -> str:
        keys = ("family", "backbone", "descriptor_dim")
        return f"VPRModel({', '.join(f'{k}={self.config.get(k)!r}' for k in keys)})"

    # Pure functions of (state, inputs); the Python body runs only when tracing.
    def _merge(self, state):
        return nnx.merge(self._graphdef, state)

    def _pure_call(self, state, images, attention, alpha):
        self.trace_counts["__call__"] += 1
        return self._merge(state)(images, attention, alpha)

    def _pure_features(self, state, images):
        self.trace_counts["features"] += 1
        return self._merge(state).features(images)

    def _pure_aggregate(self, state, feats, attention, alpha):
        self.trace_counts["aggregate"] += 1
        return self._merge(state).aggregate(feats, attention, alpha)

    def _pure_sweep(self, state, feats, attention, alphas):
        self.trace_counts["aggregate_sweep"] += 1
        net = self._merge(state)
        return jax.vmap(lambda a: net.aggregate(feats, attention, a))(alphas)

    def preprocess(self, pil_image: Image.Image, image_size: int | Sequence[int] | None = None) -> np.ndarray:
        """The family's evaluation transform: ``PIL image -> [H, W, 3]`` float32 (see :func:`preprocess_image`).

        Args:
            pil_image: the image.
            image_size: optional override of the config's size (int: shorter side; ``(H, W)``: exact).
        """
        config = self.config.get("preprocess") or default_preprocess_config(self.config.get("family", ""))
        return preprocess_image(pil_image, config, image_size)

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

    def features(self, images: jax.Array | np.ndarray) -> jax.Array | dict:
        """The backbone output of ``[B, H, W, 3]`` images (CNN: ``[B, h, w, C]``; SALAD: a dict)."""
        return self._jit_features(self._state, _check_images(images))

    def aggregate(
        self, feats: jax.Array | dict, attention: jax.Array | None = None, alpha: float | jax.Array = 0.0
    ) -> jax.Array:
        """Descriptors ``[B, D]`` from :meth:`features` output, optionally attention-modulated."""
        return self._jit_aggregate(self._state, feats, *_attention_args(attention, alpha))

    def aggregate_sweep(self, feats: jax.Array | dict, attention: jax.Array, alphas: Sequence[float]) -> jax.Array:
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
        return self._jit_sweep(self._state, feats, jnp.asarray(attention, jnp.float32), alphas)

    def feature_grid(self, feats: jax.Array | dict) -> tuple[int, int]:
        """The ``(h, w)`` grid of :meth:`features` output, the resolution attention maps are resized to."""
        if hasattr(self.net, "feature_grid"):
            return self.net.feature_grid(feats)
        patches = feats["patches"] if isinstance(feats, dict) else feats
        return int(patches.shape[1]), int(patches.shape[2])


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
