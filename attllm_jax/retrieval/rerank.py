"""Query expansion re-ranking: average query expansion (AQE) and alpha query expansion (alphaQE).

Both take each query's top-k database descriptors from a first search, build an expanded query and search again
(docs/DESIGN.md "Re-ranking and the paper's open questions"). They are vectorized over the attention-alpha sweep:
the expanded queries of every alpha ``[K, Q, D]`` are built at once and searched in one more call of
:func:`~attllm_jax.retrieval.retrieve.retrieve` (one extra search per alpha, not per query).

* AQE, as the paper code's ``average_query_expansion`` writes it (Chum et al., ICCV 2007, "Total Recall"):
  ``q' = w q + (1 - w) mean_{i <= k} d_i``. Not re-normalized: the ranking of an inner-product search does not
  change with the scale of ``q'``; the scores are those of ``q'`` as written.
* alphaQE (Radenovic, Tolias, Chum, TPAMI 2019, "Fine-tuning CNN image retrieval with no human annotation"):
  ``q' = normalize(q + sum_{i <= k} max(q . d_i, 0)^alpha d_i)``. The similarity is floored at 0 so that a
  fractional power of a negative similarity is defined (the paper's descriptors are non-negative after ReLU, ours
  need not be); ``alpha`` here is the expansion's power, not the attention blend factor.

Neighbours that do not exist (prediction -1: fewer valid database rows than k, unreadable queries) are left out of
the mean and the sum; a query with none keeps ``q' = q``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from attllm_jax.retrieval.retrieve import Retrieval, retrieve
from attllm_jax.retrieval.search import MemoryPlan, SearchSpec

RERANK_KINDS = ("aqe", "alpha_qe")
_PARAMS = {"aqe": ("k", "w"), "alpha_qe": ("k", "alpha")}
GATHER_BUDGET_BYTES = 256 * 2**20  # alphas are expanded in chunks whose [k_alphas, Q, k, D] neighbours fit this


class RerankSpecError(ValueError):
    """A --rerank value that cannot be parsed or holds a bad parameter; the message names it."""


@dataclass(frozen=True)
class RerankSpec:
    """One query-expansion stage.

    Attributes:
        kind: ``"aqe"`` or ``"alpha_qe"``.
        k: Neighbours of the first search used to expand the query (>= 1).
        w: AQE's weight of the original query, in [0, 1] (None for alphaQE).
        alpha: alphaQE's power, >= 0 (None for AQE).
    """

    kind: str
    k: int
    w: float | None = None
    alpha: float | None = None

    def params(self) -> dict[str, Any]:
        """The stage's parameters as written to results.json (``{"k": 5, "w": 0.8}``)."""
        return {name: getattr(self, name) for name in _PARAMS[self.kind]}

    def label(self) -> str:
        """The canonical ``--rerank`` text of this stage (``aqe:k=5,w=0.8``)."""
        return f"{self.kind}:" + ",".join(f"{n}={v:g}" for n, v in self.params().items())


def parse_rerank(text: str) -> RerankSpec:
    """Parses one ``--rerank`` value: ``aqe:k=5,w=0.8`` or ``alpha_qe:k=5,alpha=3``.

    Raises:
        RerankSpecError: naming the value and what is wrong with it (unknown kind, missing / unknown / repeated
            parameter, a value out of range).
    """
    where = f"--rerank {text!r}"
    kind, sep, rest = str(text).strip().partition(":")
    if kind not in RERANK_KINDS:
        raise RerankSpecError(f"{where}: unknown stage {kind!r}; valid: aqe:k=5,w=0.8 or alpha_qe:k=5,alpha=3")
    values: dict[str, float] = {}
    for item in rest.split(",") if sep and rest.strip() else []:
        name, eq, value = item.strip().partition("=")
        if not eq or name not in _PARAMS[kind]:
            names = ", ".join(n + "=" for n in _PARAMS[kind])
            raise RerankSpecError(f"{where}: {item.strip()!r} is not one of {names}")
        if name in values:
            raise RerankSpecError(f"{where}: {name} given twice")
        try:
            values[name] = float(value)
        except ValueError:
            raise RerankSpecError(f"{where}: {name}={value!r} is not a number") from None
    missing = [n for n in _PARAMS[kind] if n not in values]
    if missing:
        raise RerankSpecError(f"{where}: missing {', '.join(missing)} (e.g. {_example(kind)})")
    k = values["k"]
    if not (math.isfinite(k) and k == int(k) and k >= 1):
        raise RerankSpecError(f"{where}: k must be an integer >= 1, got {k:g}")
    if kind == "aqe":
        w = values["w"]
        if not (math.isfinite(w) and 0.0 <= w <= 1.0):
            raise RerankSpecError(f"{where}: w must lie in [0, 1], got {w:g}")
        return RerankSpec("aqe", int(k), w=w)
    power = values["alpha"]
    if not (math.isfinite(power) and power >= 0.0):
        raise RerankSpecError(f"{where}: alpha must be a number >= 0, got {power:g}")
    return RerankSpec("alpha_qe", int(k), alpha=power)


def _example(kind: str) -> str:
    return "aqe:k=5,w=0.8" if kind == "aqe" else "alpha_qe:k=5,alpha=3"


def parse_reranks(texts: Sequence[str]) -> tuple[RerankSpec, ...]:
    """Parses every ``--rerank`` value; one stage per kind (results.json keys the stages by kind).

    Raises:
        RerankSpecError: a bad value, or two stages of one kind.
    """
    specs = tuple(parse_rerank(t) for t in texts)
    kinds = [s.kind for s in specs]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise RerankSpecError(f"--rerank: one stage per kind, got {kinds.count(repeated[0])} of {repeated[0]!r}")
    return specs


@jax.jit
def aqe_expand(queries: ArrayLike, neighbours: ArrayLike, mask: ArrayLike, w: ArrayLike) -> jax.Array:
    """Average query expansion ``q' = w q + (1 - w) mean(d_i)`` over the existing neighbours.

    Args:
        queries: ``[..., Q, D]``.
        neighbours: ``[..., Q, k, D]`` top-k database descriptors of each query.
        mask: ``[..., Q, k]`` bool, False for neighbours that do not exist.
        w: Scalar weight of the original query.

    Returns:
        ``[..., Q, D]`` float32; a query without any neighbour is returned unchanged.
    """
    q, d = jnp.asarray(queries, jnp.float32), jnp.asarray(neighbours, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    count = m.sum(-1, keepdims=True)
    mean = jnp.einsum("...qk,...qkd->...qd", m, d, precision="highest") / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, w * q + (1.0 - w) * mean, q)


@jax.jit
def alpha_qe_expand(queries: ArrayLike, neighbours: ArrayLike, mask: ArrayLike, power: ArrayLike) -> jax.Array:
    """Alpha query expansion ``q' = normalize(q + sum_i max(q . d_i, 0)^power d_i)`` over the existing neighbours.

    Args:
        queries: ``[..., Q, D]``.
        neighbours: ``[..., Q, k, D]``.
        mask: ``[..., Q, k]`` bool.
        power: Scalar exponent (>= 0; ``0`` weighs every neighbour 1).

    Returns:
        ``[..., Q, D]`` float32 unit vectors (a zero query without neighbours stays zero).
    """
    q, d = jnp.asarray(queries, jnp.float32), jnp.asarray(neighbours, jnp.float32)
    similarity = jnp.einsum("...qd,...qkd->...qk", q, d, precision="highest")
    weights = jnp.where(jnp.asarray(mask), jnp.power(jnp.maximum(similarity, 0.0), power), 0.0)
    expanded = q + jnp.einsum("...qk,...qkd->...qd", weights, d, precision="highest")
    # x / max(||x||, 1e-12), torch's normalize (attllm_jax.ops.l2_normalize; retrieval sits below ops in the layers)
    return expanded / jnp.maximum(jnp.linalg.norm(expanded, axis=-1, keepdims=True), 1e-12)


def gather_rows(database, rows: np.ndarray) -> np.ndarray:
    """``database[rows]`` ``[len(rows), D]`` float32 for an array or a lazily read store (read slice by slice,
    so a store is never read whole for a shortlist)."""
    rows = np.asarray(rows, np.int64)
    if isinstance(database, np.ndarray):
        return np.asarray(database[rows], np.float32)
    unique, inverse = np.unique(rows, return_inverse=True)
    out = np.zeros((len(unique), database.shape[1]), np.float32)
    step = int(getattr(database, "chunk_size", 4096))
    for chunk in np.unique(unique // step):
        lo = int(chunk) * step
        inside = (unique >= lo) & (unique < lo + step)
        block = np.asarray(database[lo : min(lo + step, len(database))], np.float32)
        out[inside] = block[unique[inside] - lo]
    return out[inverse]


def expand_queries(spec: RerankSpec, queries: np.ndarray, predictions: np.ndarray, database) -> np.ndarray:
    """The expanded queries of every alpha.

    Args:
        spec: The stage.
        queries: ``[K, Q, D]`` descriptors of the first search.
        predictions: ``[K, Q, M]`` its database indices, best first (-1 = none), ``M >= spec.k``.
        database: ``[N, D]`` array-like (an array or a store's lazy view).

    Returns:
        ``[K, Q, D]`` float32 expanded queries.
    """
    k_alphas, n_queries, dim = queries.shape
    if predictions.shape[-1] < spec.k:
        raise ValueError(f"--rerank {spec.label()}: k = {spec.k} exceeds the {predictions.shape[-1]} predictions kept")
    top = np.asarray(predictions[..., : spec.k])
    mask = top >= 0
    used = np.unique(top[mask])
    rows = gather_rows(database, used) if len(used) else np.zeros((0, dim), np.float32)
    position = np.zeros(int(used.max()) + 1 if len(used) else 1, np.int64)
    position[used] = np.arange(len(used))
    chunk = max(1, GATHER_BUDGET_BYTES // max(1, 4 * n_queries * spec.k * dim))
    out = np.empty((k_alphas, n_queries, dim), np.float32)
    for start in range(0, k_alphas, chunk):
        part = slice(start, min(start + chunk, k_alphas))
        neighbours = rows[position[np.where(mask[part], top[part], 0)]] if len(used) else _zeros(top[part], dim)
        if spec.kind == "aqe":
            out[part] = aqe_expand(queries[part], neighbours, mask[part], np.float32(spec.w))
        else:
            out[part] = alpha_qe_expand(queries[part], neighbours, mask[part], np.float32(spec.alpha))
    return out


def _zeros(top: np.ndarray, dim: int) -> np.ndarray:
    return np.zeros((*top.shape, dim), np.float32)


def rerank(
    spec: RerankSpec,
    database,
    database_valid: np.ndarray,
    queries: np.ndarray,
    queries_valid: np.ndarray,
    first: Retrieval,
    positives: list[np.ndarray],
    *,
    search: SearchSpec | None = None,
    plan: MemoryPlan | None = None,
    devices: list | None = None,
) -> tuple[Retrieval, np.ndarray]:
    """Expands every alpha's queries from the first search's top-k and searches them again in one call.

    Args:
        spec: The stage.
        database: ``[N, D]`` array-like; ``database_valid`` ``[N]`` bool.
        queries: ``[K, Q, D]`` the first search's query descriptors; ``queries_valid`` ``[Q]`` bool.
        first: The first search's retrieval (its predictions ``[K, Q, M]`` give the neighbours).
        positives: Q arrays of positive database indices (for recall only; the expansion never reads them).
        search: The search method (the first search's); plan: its memory plan; devices: of ``exact_jax``.

    Returns:
        The re-ranked retrieval (same alphas, recall values and M as ``first``) and the expanded queries
        ``[K, Q, D]``.
    """
    expanded = expand_queries(spec, queries, first.predictions, database)
    top_m = first.predictions.shape[-1]
    found = retrieve(
        database,
        database_valid,
        expanded,
        queries_valid,
        positives,
        first.alphas,
        first.recall_values,
        top_m,
        spec=search,
        plan=plan,
        devices=devices,
    )
    return found, expanded
