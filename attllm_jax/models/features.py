"""What a network's ``features`` step hands to its ``aggregate`` step: one registered pytree per family.

Every family's network has the same interface::

    feats = net.features(images)                    # [B, H, W, 3] -> a Features pytree
    feats.grid                                      # (h, w): the grid attention maps are resized to
    net.aggregate(feats, attention=None, alpha=0.0) # -> [B, D] L2-normalized descriptors

so :class:`~attllm_jax.models.vpr.VPRModel`, the evaluation pipeline and the sweeps never look at the type.
Features are pytrees (``jax.tree_util.register_dataclass``): they pass through ``jax.jit``, ``jax.device_put``
and ``jax.vmap`` like arrays.
"""

from __future__ import annotations

import dataclasses

import jax


class Features:
    """Base of the per-family feature pytrees (``CnnFeatures``, ``SaladFeatures``, ...)."""

    @property
    def grid(self) -> tuple[int, int]:
        """The ``(h, w)`` spatial grid of the features."""
        raise NotImplementedError

    @property
    def batch_size(self) -> int:
        """``B``."""
        return int(jax.tree_util.tree_leaves(self)[0].shape[0])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CnnFeatures(Features):
    """CosPlace / EigenPlaces backbone output.

    Attributes:
        maps: the raw (not yet L2-normalized) backbone feature map ``[B, h, w, C]``.
    """

    maps: jax.Array

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.maps.shape[1]), int(self.maps.shape[2])


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenFeatures(Features):
    """Vision-transformer tokens after the final norm (SALAD and other DINOv2 families).

    Attributes:
        patches: patch tokens on their grid ``[B, h, w, C]``.
        cls: the class token ``[B, C]``.
    """

    patches: jax.Array
    cls: jax.Array

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patches.shape[1]), int(self.patches.shape[2])
