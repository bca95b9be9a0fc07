"""Recall of any (alpha, sigma, blend) from caches: only aggregation and search, never the backbone.

:class:`CachedRetrieval` holds the cached query features, the parsed attention answers, the database
descriptors (from the store) and the positives. For a grid of alphas it aggregates every cached batch in one
vmapped call (``model.aggregate_sweep``) through the evaluation's own batch function
(:func:`attllm_jax.evaluation.extract.aggregate_query_batch`), and searches with the evaluation's own
:func:`attllm_jax.retrieval.retrieve.retrieve`, so its recalls are those of ``experiments.eval`` at the same
settings. A new sigma only re-renders the attention maps; a new blend only swaps the aggregation head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from attllm_jax import ops
from attllm_jax.attention.maps import attention_maps, attention_mask
from attllm_jax.attention.parse import ParsedAttention, stack_attention
from attllm_jax.evaluation.extract import aggregate_query_batch, combine_query_batch
from attllm_jax.models.blend import with_blend  # noqa: F401 - re-exported: tuning.with_blend
from attllm_jax.models.vpr import DescriptorModel
from attllm_jax.retrieval.adaptive import top_margins
from attllm_jax.retrieval.retrieve import retrieve
from attllm_jax.tuning.cache import QueryFeatures

DESCRIPTOR_BUDGET_BYTES = 512 * 2**20  # alphas are searched in chunks whose [k, Q, D] descriptors fit this


class RankSource(Protocol):
    """What the searches and the cross-validation need: first-hit ranks of all queries at any setting."""

    num_queries: int
    recall_values: tuple[int, ...]

    def retrieval(self, alpha: float, sigma: float, blend: str, top_m: int):
        """The descriptors ``[1, Q, D]`` and the full retrieval (top-``top_m`` predictions and scores) at one point,
        not memoized: what a re-ranking stage starts from (tune ``--rerank``)."""
        ...

    def first_hits(self, alphas: Sequence[float], sigma: float, blend: str) -> np.ndarray:
        """``[K, Q]`` int64 0-based rank of each query's first positive (-1 = miss) for each alpha."""
        ...


@dataclass
class SurrogateProblem:
    """A differentiable view of the queries with attention, for the optax search.

    Attributes:
        batches: ``(inputs, indices)`` pairs: a pytree of arrays ``describe`` reads, and ``[b]`` query indices
            (-1 for rows that do not take part: padding, no attention, unreadable).
        describe: ``(inputs, alpha, sigma) -> [b, D]`` unit descriptors; traceable, differentiable in alpha and
            sigma.
        database: ``[N', D]`` readable database descriptors.
        positives: ``[Q, P]`` int32 rows of ``database`` that are positives of each query, -1 padded.
        compiled: Jitted surrogate gradients built on this problem (filled by :mod:`.surrogate`).
    """

    batches: list[tuple[Any, np.ndarray]]
    describe: Any
    database: jax.Array
    positives: np.ndarray
    compiled: dict = field(default_factory=dict)


class CachedRetrieval:
    """First-hit ranks of every query at any (alpha, sigma, blend), from cached features.

    Args:
        model: The :class:`~attllm_jax.models.vpr.VPRModel` the features were extracted with.
        features: Its cached query features.
        attention: One parsed answer (or None) per query.
        database: ``[N, D]`` database descriptors (zeros where unreadable).
        database_valid: ``[N]`` bool.
        positives: Q arrays of positive database indices (readable images only, as the evaluation uses).
        recall_values: The N of recall@N.
        grid_interpolate: Bilinear upsampling of grid answers.
        search: The evaluation's search settings (default exact faiss Flat), so both search alike.

    Attributes:
        evaluations: How many (alpha, sigma, blend) points were aggregated and searched.
    """

    def __init__(
        self,
        model: DescriptorModel,
        features: QueryFeatures,
        attention: Sequence[ParsedAttention | None],
        database: np.ndarray,
        database_valid: np.ndarray,
        positives: Sequence[np.ndarray],
        recall_values: Sequence[int],
        grid_interpolate: bool = False,
        search=None,
    ):
        if len(attention) != len(features.valid) or len(positives) != len(features.valid):
            raise ValueError(
                f"{len(attention)} attention answers and {len(positives)} positive lists for "
                f"{len(features.valid)} queries"
            )
        self.model = model
        self.features = features
        self.attention = list(attention)
        self.database = np.asarray(database, np.float32)
        self.database_valid = np.asarray(database_valid, bool)
        self.positives = [np.asarray(p, np.int64) for p in positives]
        self.recall_values = tuple(int(n) for n in recall_values)
        self.grid_interpolate = bool(grid_interpolate)
        self.search = search
        self.num_queries = len(features.valid)
        self.has_attention = attention_mask(self.attention)
        self.evaluations = 0
        self._models = {getattr(model.spec.architecture, "blend", "native"): model}
        self._treedefs: dict[tuple, Any] = {}
        self._memo: dict[tuple[float, float, str], np.ndarray] = {}
        self._margins: dict[tuple[float, float, str], np.ndarray] = {}

    def model_for(self, blend: str):
        """The model aggregating with ``blend`` (see :func:`with_blend`)."""
        if blend not in self._models:
            self._models[blend] = with_blend(self.model, blend)
        return self._models[blend]

    def _features(self, batch, model):
        shape = (len(batch.indices), *batch.image_shape)
        if shape not in self._treedefs:
            spec = jax.ShapeDtypeStruct((*shape, 3), jnp.float32)
            self._treedefs[shape] = jax.tree_util.tree_structure(jax.eval_shape(model.features, spec))
        return jax.tree_util.tree_unflatten(self._treedefs[shape], [jnp.asarray(leaf) for leaf in batch.leaves])

    def descriptors(self, alphas: Sequence[float], sigma: float, blend: str) -> np.ndarray:
        """``[K, Q, D]`` query descriptors exactly as ``experiments.eval`` computes them (zeros for unreadable)."""
        alphas = np.asarray(ops.validate_alpha(np.asarray(alphas, np.float32), "alphas"), np.float32).reshape(-1)
        model = self.model_for(blend)
        out = None
        for batch in self.features.batches:
            feats = self._features(batch, model)
            rows = [self.attention[i] if i >= 0 else None for i in batch.indices]
            real = batch.indices >= 0
            result = combine_query_batch(
                *aggregate_query_batch(model, feats, rows, real, alphas, float(sigma), self.grid_interpolate),
                len(alphas),
            )
            if out is None:
                out = np.zeros((len(alphas), self.num_queries, result.shape[-1]), np.float32)
            out[:, batch.indices[real]] = result[:, real]
        if out is None:
            out = np.zeros((len(alphas), self.num_queries, self.database.shape[1]), np.float32)
        return out

    def retrieval(self, alpha: float, sigma: float, blend: str, top_m: int):
        """The descriptors ``[1, Q, D]`` and the full retrieval (top-``top_m`` predictions and scores) at one point,
        not memoized: what a re-ranking stage starts from (tune ``--rerank``)."""
        desc = self.descriptors([alpha], sigma, blend)
        found = retrieve(
            self.database, self.database_valid, desc, self.features.valid, self.positives, (float(alpha),),
            self.recall_values, int(top_m), spec=self.search,
        )  # fmt: skip
        return desc, found

    def first_hits(self, alphas: Sequence[float], sigma: float, blend: str) -> np.ndarray:
        """``[K, Q]`` first-hit ranks (-1 = miss), each new point aggregated and searched once (memoized)."""
        keys = self._search(alphas, sigma, blend)
        return np.stack([self._memo[key] for key in keys])

    def margins(self, alphas: Sequence[float], sigma: float, blend: str) -> np.ndarray:
        """``[K, Q]`` top-1 minus top-2 similarity of each query's ranking (no labels; the ``--alpha_policy``
        margin), from the same memoized searches as :meth:`first_hits`."""
        keys = self._search(alphas, sigma, blend)
        return np.stack([self._margins[key] for key in keys])

    def _search(self, alphas: Sequence[float], sigma: float, blend: str) -> list[tuple[float, float, str]]:
        """Aggregates and searches the points not searched yet; returns the memo keys of ``alphas``."""
        # alphas within 1e-12 share a memo entry: a computed midpoint (0.81 + 0.83) / 2 reuses the grid's 0.82
        alphas = [round(float(a), 12) for a in np.asarray(alphas, np.float64).reshape(-1)]
        keys = [(a, float(sigma), blend) for a in alphas]
        todo = sorted({a for a, key in zip(alphas, keys, strict=True) if key not in self._memo})
        dim = max(1, self.database.shape[1])
        chunk = max(1, DESCRIPTOR_BUDGET_BYTES // (4 * dim * max(1, self.num_queries)))
        top_m = max(*self.recall_values, 2)  # two scores for the margin; recall reads only the first max(N) ranks
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            desc = self.descriptors(part, sigma, blend)
            found = retrieve(
                self.database,
                self.database_valid,
                desc,
                self.features.valid,
                self.positives,
                tuple(part),
                self.recall_values,
                top_m,
                spec=self.search,
            )
            for k, a in enumerate(part):
                self._memo[(a, float(sigma), blend)] = found.first_hit[k]
                self._margins[(a, float(sigma), blend)] = top_margins(found.scores[k])
            self.evaluations += len(part)
        return keys

    def surrogate(self, blend: str) -> SurrogateProblem:
        """The differentiable view of the queries with attention under ``blend`` (for :mod:`.surrogate`)."""
        model = self.model_for(blend)
        valid_rows = np.flatnonzero(self.database_valid)
        position = np.full(len(self.database_valid), -1, np.int64)
        position[valid_rows] = np.arange(len(valid_rows))
        width = max([len(p) for p in self.positives] + [1])
        positives = np.full((self.num_queries, width), -1, np.int32)
        for q, p in enumerate(self.positives):
            rows = position[p]
            rows = rows[rows >= 0]
            positives[q, : len(rows)] = rows
        batches = []
        for batch in self.features.batches:
            feats = self._features(batch, model)
            rows = [self.attention[i] if i >= 0 else None for i in batch.indices]
            height, width_ = model.feature_grid(feats)
            stacked = stack_attention(rows)
            grid_maps = attention_maps(rows, height, width_, grid_interpolate=self.grid_interpolate)
            is_grid = np.array([r is not None and r.kind == "grid" for r in rows], bool)
            take = attention_mask(rows) & (batch.indices >= 0)
            take &= np.array([i >= 0 and bool(self.features.valid[i]) for i in batch.indices], bool)
            inputs = {
                "feats": feats,
                "centers": jnp.asarray(stacked.centers),
                "weights": jnp.asarray(stacked.weights),
                "valid": jnp.asarray(stacked.valid),
                "grid_maps": grid_maps,
                "is_grid": jnp.asarray(is_grid),
            }
            batches.append((inputs, np.where(take, batch.indices, -1)))

        def describe(inputs, alpha, sigma):
            height, width_ = inputs["grid_maps"].shape[1:]
            rbf = ops.rbf_attention_map(
                inputs["centers"], inputs["weights"], height, width_, sigma=sigma, valid=inputs["valid"]
            )
            maps = jnp.where(inputs["is_grid"][:, None, None], inputs["grid_maps"], rbf)
            return model.aggregate(inputs["feats"], maps, alpha)

        return SurrogateProblem(batches, describe, jnp.asarray(self.database[valid_rows]), positives)
