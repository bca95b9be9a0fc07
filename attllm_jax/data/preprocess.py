"""The evaluation transform of a model: PIL image -> resized, ImageNet-normalized ``[H, W, 3]`` float32.

A :class:`PreprocessSpec` is part of every :class:`~attllm_jax.models.spec.ModelSpec` (written to ``config.json``)
and is applied by :func:`preprocess_image` (what ``VPRModel.preprocess`` calls):

- ``resize="shorter_side"`` (CosPlace / EigenPlaces, ``size=512``): torchvision ``Resize(512)`` semantics, the
  shorter side becomes ``size`` and the longer one ``int(size * long / short)`` (floored);
- ``resize="exact"`` (SALAD, ``size=(322, 322)``): ``Resize((height, width))``;
- ``resize="none"`` (MegaLoc, ``size=None``): the image's own size (the network resizes it itself).

With ``stage="pil"`` resampling is PIL's (what torchvision's ``Resize`` uses on PIL images), which antialiases
when downscaling; then ``ToTensor`` scaling to [0, 1] and ``Normalize(mean, std)``. With ``stage="tensor"`` (BoQ,
as VPR-methods-evaluation: ``ToTensor``, ``Normalize``, then ``Resize(size, antialias=True)`` of the float tensor)
the image is scaled and normalized first and then resized in float32 with torch's antialiased bilinear weights
(:func:`attllm_jax.ops.resize.antialiased_bilinear_matrix`); no uint8 rounding after the resize.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("shorter_side", "exact", "none")
STAGES = ("pil", "tensor")
_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
INTERPOLATIONS = tuple(_PIL_FILTERS)


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
    """An evaluation transform.

    Attributes:
        resize: ``"shorter_side"`` (``size`` is an int), ``"exact"`` (``size`` is ``(height, width)``) or ``"none"``
            (``size`` is None).
        size: the shorter side in pixels, the exact ``(height, width)``, or None.
        interpolation: PIL filter, ``"bilinear"``, ``"bicubic"`` or ``"nearest"``.
        antialias: whether downscaling antialiases; PIL always does, so only True is supported (the field is
            recorded so that a transform that does not can be told apart).
        stage: ``"pil"`` (resize the decoded image, then scale) or ``"tensor"`` (scale and normalize, then resize the
            float image; bilinear only).
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel standard deviation divided by.
    """

    resize: str
    size: int | tuple[int, int] | None
    interpolation: str = "bilinear"
    antialias: bool = True
    stage: str = "pil"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.antialias is not True:
            raise ValueError(f"antialias must be true (PIL resizing always antialiases), got {self.antialias!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.stage == "tensor" and self.interpolation != "bilinear":
            raise ValueError(f"stage 'tensor' resizes bilinearly only, got interpolation {self.interpolation!r}")
        object.__setattr__(self, "size", _check_size(self.resize, self.size, "size"))
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3 or (name == "std" and min(values) <= 0):
                raise ValueError(f"{name} must be 3 numbers{' > 0' if name == 'std' else ''}, got {values}")
            object.__setattr__(self, name, values)

    @classmethod
    def shorter_side(cls, size: int = 512) -> PreprocessSpec:
        """CosPlace / EigenPlaces: shorter side to ``size`` (512), bilinear, ImageNet normalization."""
        return cls("shorter_side", size)

    @classmethod
    def exact(cls, size: Sequence[int] = (322, 322)) -> PreprocessSpec:
        """SALAD: resize to ``(height, width)`` (322 x 322), bilinear, ImageNet normalization."""
        return cls("exact", tuple(size))

    @classmethod
    def tensor(cls, size: Sequence[int] | None) -> PreprocessSpec:
        """BoQ / MegaLoc: normalize, then an antialiased bilinear resize of the float image to ``(height, width)``
        (``None``: no resize)."""
        if size is None:
            return cls("none", None, stage="tensor")
        return cls("exact", tuple(size), stage="tensor")

    def with_size(self, image_size: int | Sequence[int] | None) -> PreprocessSpec:
        """This transform with a size override: an int resizes the shorter side, ``(height, width)`` exactly."""
        if image_size is None:
            return self
        resize = "shorter_side" if np.ndim(image_size) == 0 else "exact"
        return dataclasses.replace(self, resize=resize, size=_check_size(resize, image_size, "image_size"))

    def to_dict(self) -> dict:
        """JSON form (lists for tuples); the inverse of ``PreprocessSpec(**d)``."""
        size = self.size if self.size is None or isinstance(self.size, int) else list(self.size)
        return {**dataclasses.asdict(self), "size": size, "mean": list(self.mean), "std": list(self.std)}


def _check_size(resize: str, size, name: str) -> int | tuple[int, int] | None:
    if resize == "none":
        if size is not None:
            raise ValueError(f"{name} must be null for resize='none', got {size!r}")
        return None
    if resize == "shorter_side":
        if np.ndim(size) != 0 or isinstance(size, bool) or int(size) != size or int(size) <= 0:
            raise ValueError(f"{name} must be positive (an int for resize='shorter_side'), got {size!r}")
        return int(size)
    if np.ndim(size) != 1 or len(size) != 2 or any(int(s) != s or int(s) <= 0 for s in size):
        raise ValueError(f"{name} must be an int or a positive (height, width) pair, got {size!r}")
    return int(size[0]), int(size[1])


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)`` output ``(width, height)``: shorter side ``size``, longer side floored."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def output_size(
    width: int, height: int, spec: PreprocessSpec, image_size: int | Sequence[int] | None = None
) -> tuple[int, int]:
    """The ``(width, height)`` :func:`preprocess_image` gives a ``width x height`` image (known before decoding)."""
    spec = spec.with_size(image_size)
    if spec.resize == "shorter_side":
        return shorter_side_size(width, height, spec.size)
    if spec.resize == "exact":
        return spec.size[1], spec.size[0]
    return width, height


def preprocess_image(
    image: Image.Image, spec: PreprocessSpec, image_size: int | Sequence[int] | None = None
) -> np.ndarray:
    """Applies an evaluation transform to one PIL image.

    Args:
        image: any PIL image (converted to RGB).
        spec: the transform.
        image_size: optional override: an int resizes the shorter side to it, ``(height, width)`` resizes exactly.

    Returns:
        ``[H, W, 3]`` float32, scaled to [0, 1] then normalized with ``mean`` / ``std``.

    Raises:
        ValueError: ``image`` is not a PIL image, or a malformed ``image_size``.
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"preprocess expects a PIL image, got {type(image).__name__}")
    spec = spec.with_size(image_size)
    image = image.convert("RGB")
    out_size = output_size(image.width, image.height, spec)
    if out_size != image.size and spec.stage == "pil":
        image = image.resize(out_size, _PIL_FILTERS[spec.interpolation])
    x = np.asarray(image, dtype=np.float32) / 255.0
    x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if out_size != image.size:  # stage "tensor"
        x = _resize_float(x, out_size[1], out_size[0])
    return x


def _resize_float(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's antialiased bilinear resize of a float32 ``[H, W, 3]`` image (float32 weights and products)."""
    from attllm_jax.ops.resize import antialiased_bilinear_matrix

    rows = antialiased_bilinear_matrix(x.shape[0], height).astype(np.float32)
    cols = antialiased_bilinear_matrix(x.shape[1], width).astype(np.float32)
    x = np.einsum("qw,hwc->hqc", cols, x, optimize=True)  # [H, width, 3]: columns first, as torch does
    return np.ascontiguousarray(np.tensordot(rows, x, axes=(1, 0)), dtype=np.float32)
