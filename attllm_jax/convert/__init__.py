"""PyTorch checkpoint -> Flax NNX conversion (strict both ways), used by the scripts in ``converters/``.

Nothing here imports torch at module level: :func:`attllm_jax.convert.common.read_state_dict` imports it only to
read ``.pth``/``.ckpt`` files.
"""
