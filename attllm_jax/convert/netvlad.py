"""Converts the NetVLAD release (a MATLAB struct, hloc's ``Pitts30K_struct.mat``) into a
:class:`~attllm_jax.models.netvlad.NetVLADNet`.

The file is Relja Arandjelovic's MatConvNet network exported as a plain struct (uzh-rpg/netvlad_tf_open
``net_class2struct.m``). :func:`read_checkpoint` reads it as hloc and VPR-methods-evaluation do
(``scipy.io.loadmat(path, struct_as_record=False, squeeze_me=True)``) and flattens it into ``{key: array}``:

- ``layers.{i}.weights.{j}``: the ``j``-th array of the weights cell of ``net.layers{i}`` (layers without weights
  give no key). VGG-16's 13 convolutions sit at the same indices as in torchvision's ``features`` (0, 2, 5, ...,
  28), kernels ``(S, S, IN, OUT)`` (already Flax's layout) and biases ``(OUT,)``; layer 30 is the VLAD core
  (assignment ``D x K``, no bias, and the centres ``D x K`` stored NEGATED); layer 33 the PCA whitening
  (``1 x 1 x 32768 x 4096``, squeezed to two dimensions by ``squeeze_me``, and a bias ``4096``).
- ``meta.normalization.averageImage``: the average image; its pixel ``[0, 0]`` is the mean RGB pixel subtracted
  from the 0-255 input (exactly what hloc takes; a ``1 x 1 x 3`` image squeezed to ``(3,)`` is used as it is).

The rest of ``meta`` (class names, image size, ...) holds no weights and is not read. Every weight array in the
layers must fill a target (the 32768-d variant explicitly leaves out layer 33), every target must be filled, shapes
must match: all problems are listed in one error.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from attllm_jax.convert.common import DEFAULT_IGNORE, ConversionError, DimensionOptions, TensorSource, describe_keys
from attllm_jax.convert.keytable import KeyTable, Rule, check_family, convert_with_table
from attllm_jax.models.netvlad import NetVLADSpec
from attllm_jax.models.spec import ModelSpec

CONVERTER_VERSION = "1.0"
FAMILY = "netvlad"
VLAD_LAYER = 30  # hloc's mat["net"].layers[30]
WHITEN_LAYER = 33  # hloc's mat["net"].layers[33]
AVERAGE_IMAGE = "meta.normalization.averageImage"


def _negate(w: np.ndarray) -> np.ndarray:
    return -w


def _as_matrix(w: np.ndarray) -> np.ndarray:
    """``1 x 1 x IN x OUT`` (or already squeezed ``IN x OUT``) -> ``[IN, OUT]``; another rank is left for the shape
    check to report."""
    return w.reshape(w.shape[-2], w.shape[-1]) if w.ndim == 4 and w.shape[:2] == (1, 1) else w


def _as_vector(w: np.ndarray) -> np.ndarray:
    return w.reshape(-1) if w.ndim > 1 and max(w.shape) == w.size else w


def _mean_pixel(image: np.ndarray) -> np.ndarray:
    """hloc's ``averageImage[0, 0]`` of an ``(H, W, 3)`` image; a squeezed ``(3,)`` pixel as it is."""
    return image[0, 0] if image.ndim == 3 else image


# Our NetVLADNet -> flattened struct. Kernels are (S, S, IN, OUT) in the file, Flax's own layout: no transposes.
KEYS = KeyTable(
    rules=(
        Rule(r"backbone/features/(\d+)/kernel", r"layers.\1.weights.0", None),
        Rule(r"backbone/features/(\d+)/bias", r"layers.\1.weights.1", _as_vector),
        Rule("netvlad/score_proj/kernel", f"layers.{VLAD_LAYER}.weights.0", None),
        Rule("netvlad/centers", f"layers.{VLAD_LAYER}.weights.1", _negate),
        Rule("whiten/kernel", f"layers.{WHITEN_LAYER}.weights.0", _as_matrix),
        Rule("whiten/bias", f"layers.{WHITEN_LAYER}.weights.1", _as_vector),
        Rule("pixel_mean", AVERAGE_IMAGE, _mean_pixel),
    ),
)


def _cell(value) -> list[np.ndarray]:
    """The arrays of a MATLAB cell as ``loadmat(squeeze_me=True)`` returns it (a one-element cell is its element)."""
    if value is None:
        return []
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [np.asarray(v) for v in value.ravel()]
    value = np.asarray(value)
    return [] if value.size == 0 else [value]


def read_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a NetVLAD ``.mat`` struct into ``{"layers.{i}.weights.{j}": array, AVERAGE_IMAGE: array}``.

    Raises:
        ConversionError: the file is missing, not a MATLAB file, or has no ``net`` struct with ``layers`` and
            ``meta.normalization.averageImage``.
    """
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint file not found: {path}")
    try:
        mat = loadmat(str(path), struct_as_record=False, squeeze_me=True)
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... for non-MAT or truncated files
        raise ConversionError(f"cannot read {path} as a MATLAB struct file (truncated or not a .mat?): {e}") from e
    net = mat.get("net")
    layers = getattr(net, "layers", None)
    if net is None or layers is None:
        found = describe_keys([k for k in mat if not k.startswith("__")])
        raise ConversionError(f"{path} has no 'net' struct with 'layers' (hloc's NetVLAD format); found {found}")
    out = {}
    for i, layer in enumerate(np.atleast_1d(layers)):
        for j, array in enumerate(_cell(getattr(layer, "weights", None))):
            out[f"layers.{i}.weights.{j}"] = array
    image = getattr(getattr(getattr(net, "meta", None), "normalization", None), "averageImage", None)
    if image is None:
        raise ConversionError(f"{path} has no 'net.meta.normalization.averageImage' (the mean pixel of the input)")
    out[AVERAGE_IMAGE] = np.asarray(image)
    return out


def infer_netvlad_spec(source: TensorSource, source_name: str, descriptor_dim: int | None) -> NetVLADSpec:
    """The architecture the VLAD layer's shapes and ``descriptor_dim`` describe.

    Raises:
        ConversionError: no VLAD layer at index 30, or a ``descriptor_dim`` the file cannot give.
    """
    assign = source.shape(f"layers.{VLAD_LAYER}.weights.0")
    if assign is None or len(assign) != 2:
        raise ConversionError(
            f"{source_name} is not a NetVLAD struct: layer {VLAD_LAYER} must hold the VLAD assignment weights D x K, "
            f"got {None if assign is None else list(assign)}; found {describe_keys(source.keys())}"
        )
    num_clusters = int(assign[1])
    whiten = source.shape(f"layers.{WHITEN_LAYER}.weights.0")
    whiten_dim = None if whiten is None else int(whiten[-1])
    if descriptor_dim is not None and int(descriptor_dim) != 512 * num_clusters:
        if whiten_dim is None or int(descriptor_dim) != whiten_dim:
            raise ConversionError(
                f"{source_name}: --descriptor_dim={descriptor_dim} but the file gives {512 * num_clusters} (VLAD)"
                + ("" if whiten_dim is None else f" or {whiten_dim} (whitened)")
            )
    if descriptor_dim is not None and int(descriptor_dim) == 512 * num_clusters:
        whiten_dim = None
    return NetVLADSpec(num_clusters=num_clusters, whiten_dim=whiten_dim)


NetVLADConvertOptions = DimensionOptions
Options = DimensionOptions  # the options class of this conversion module (see attllm_jax.convert.convert)


def convert_state_dict(
    state_dict: dict,
    family: str = FAMILY,
    source_name: str = "<state dict>",
    options: NetVLADConvertOptions | None = None,
) -> tuple[nnx.Module, ModelSpec]:
    """Converts a flattened NetVLAD struct (:func:`read_checkpoint`) strictly.

    Args:
        state_dict: ``{key: array}`` as :func:`read_checkpoint` returns it.
        family: ``"netvlad"``.
        source_name: the file name used in messages.
        options: its ``descriptor_dim`` is 4096 (the whitened descriptor; the default with a whitening layer) or
            ``512 * K`` (32768: the VLAD vector, the whitening layer left out).

    Returns:
        ``(net, spec)``: the filled :class:`~attllm_jax.models.netvlad.NetVLADNet` and its spec (preprocessing:
        ToTensor and Normalize at the image's own size).

    Raises:
        ConversionError: not a NetVLAD struct, an impossible ``descriptor_dim``, or any missing / extra / misshapen
            array (all listed).
    """
    check_family(family, FAMILY)
    descriptor_dim = (NetVLADConvertOptions() if options is None else options).descriptor_dim
    probe = TensorSource(state_dict)
    arch = infer_netvlad_spec(probe, source_name, descriptor_dim)
    ignore = DEFAULT_IGNORE if arch.whiten_dim is not None else (*DEFAULT_IGNORE, f"layers.{WHITEN_LAYER}.weights.*")
    source = TensorSource(state_dict, ignore=ignore)
    return convert_with_table(FAMILY, arch, KEYS, source, arch.default_preprocess(), CONVERTER_VERSION)
