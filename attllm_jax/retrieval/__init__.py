"""Retrieval: sharded exact search in JAX, faiss indexes, positives by radius, recall@N, the descriptor store.

Modules: :mod:`~attllm_jax.retrieval.jax_search`, :mod:`~attllm_jax.retrieval.index` (faiss),
:mod:`~attllm_jax.retrieval.search` (method choice, memory plan, chunked search),
:mod:`~attllm_jax.retrieval.positives`, :mod:`~attllm_jax.retrieval.recall`, :mod:`~attllm_jax.retrieval.store`.

The public functions ``jax_exact_search`` and ``read_store`` are imported on first use, so importing the package
does not load faiss or tensorstore.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "jax_exact_search": "attllm_jax.retrieval.jax_search",
    "ShardedExactIndex": "attllm_jax.retrieval.jax_search",
    "read_store": "attllm_jax.retrieval.store",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'attllm_jax.retrieval' has no attribute {name!r}")
