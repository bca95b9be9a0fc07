"""Benchmarks and the PyTorch reference implementations: run from a checkout (``python -m benchmarks.bench_models``).

Not part of the installed package (pyproject includes ``attllm_jax``, ``experiments`` and ``converters`` only); the
tests import the references from here, with the repository root on ``sys.path``.
"""
