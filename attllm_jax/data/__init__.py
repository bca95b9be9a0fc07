"""Datasets: image folders, coordinates from file names or CSVs, threaded image loading, the synthetic benchmark.

Modules: :mod:`~attllm_jax.data.coordinates` (name conventions, UTM), :mod:`~attllm_jax.data.dataset` (image sets),
:mod:`~attllm_jax.data.loading` (thread-pool decoding, shape-grouped batches), :mod:`~attllm_jax.data.synthetic`
(the demo's flooded-street benchmark).
"""
