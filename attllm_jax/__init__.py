"""attllm_jax: LLM-guided visual place recognition for flood imagery in JAX/Flax.

Public entry points: :mod:`attllm_jax.ops` (pure, jittable array functions), :func:`load_model` (restore a converted
CosPlace / EigenPlaces / SALAD model) and :class:`ModelSpec` (the typed description every model carries as
``model.spec``).
"""

from attllm_jax import ops

__version__ = "0.1.0"


def load_model(path, precision: str = "float32", verbose: bool = False):
    """Restores a model written by a converter at ``precision`` ("float32", "tf32" or "bfloat16"); see
    :func:`attllm_jax.checkpoint.load_model`."""
    from attllm_jax.checkpoint import load_model as _load_model

    return _load_model(path, precision=precision, verbose=verbose)


def __getattr__(name: str):
    if name in ("ModelSpec", "ConfigError"):
        from attllm_jax.models import spec

        return getattr(spec, name)
    # subpackages that load heavy dependencies (faiss, tensorstore) are imported on first use: aj.retrieval
    if name == "retrieval":
        import importlib

        return importlib.import_module("attllm_jax.retrieval")
    if name in ("localize", "LocalizeSettings"):  # aj.localize(aj.LocalizeSettings(...)): typed per-photo results
        from attllm_jax import localization

        return getattr(localization, name)
    raise AttributeError(f"module 'attllm_jax' has no attribute {name!r}")


__all__ = ["ConfigError", "LocalizeSettings", "ModelSpec", "ops", "load_model", "localize", "__version__"]
