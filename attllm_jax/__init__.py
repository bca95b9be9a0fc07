"""attllm_jax: LLM-guided visual place recognition for flood imagery in JAX/Flax.

Public entry points: :mod:`attllm_jax.ops` (pure, jittable array functions) and
:func:`load_model` (restore a converted CosPlace / EigenPlaces / SALAD model).
"""

from attllm_jax import ops

__version__ = "0.1.0"


def load_model(path):
    """Restores a model written by a converter; see :func:`attllm_jax.checkpoint.load_model`."""
    from attllm_jax.checkpoint import load_model as _load_model

    return _load_model(path)


def __getattr__(name: str):
    # subpackages that load heavy dependencies (faiss, tensorstore) are imported on first use: aj.retrieval
    if name == "retrieval":
        import importlib

        return importlib.import_module("attllm_jax.retrieval")
    raise AttributeError(f"module 'attllm_jax' has no attribute {name!r}")


__all__ = ["ops", "load_model", "__version__"]
