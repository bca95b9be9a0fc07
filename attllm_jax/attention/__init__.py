"""Everything about asking the LLM where to look.

* :mod:`~attllm_jax.attention.parse`: LLM answers -> fixed-size padded arrays (``parse_answer``).
* :mod:`~attllm_jax.attention.maps`: batches of answers -> dense maps (``attention_maps``).
* :mod:`~attllm_jax.attention.store`: the per-image attention file format, the one reader and writer
  (``read_attention_file``, ``find_attention_file``, ``make_record``), with limits for untrusted files.
* :mod:`~attllm_jax.attention.prompts`, :mod:`~attllm_jax.attention.overlay`: what is sent to the model.
* :mod:`~attllm_jax.attention.request_policy`: how any request is sent (retries, rate limit, key redaction).
* :mod:`~attllm_jax.attention.providers`: one module per provider (gemini, openai_compatible) and the reader
  of existing answers (files); :mod:`~attllm_jax.attention.runner`: asking about a folder, resumably.
"""

from attllm_jax.attention.maps import attention_maps, attention_mask
from attllm_jax.attention.parse import ParsedAttention, parse_answer, stack_attention
from attllm_jax.attention.store import find_attention_file, read_attention_file

__all__ = [
    "ParsedAttention",
    "attention_mask",
    "attention_maps",
    "find_attention_file",
    "parse_answer",
    "read_attention_file",
    "stack_attention",
]
