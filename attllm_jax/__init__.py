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


__all__ = ["ops", "load_model", "__version__"]
