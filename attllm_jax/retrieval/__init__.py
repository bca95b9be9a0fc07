"""Retrieval: exact faiss search, positives by radius, recall@N, the resumable on-disk descriptor store.

Modules: :mod:`~attllm_jax.retrieval.index`, :mod:`~attllm_jax.retrieval.positives`,
:mod:`~attllm_jax.retrieval.recall`, :mod:`~attllm_jax.retrieval.store`.
"""
