"""Errors that several layers raise, defined below all of them (see docs/DESIGN.md, section 1)."""


class CoordinationError(RuntimeError):
    """The processes of a run did not meet: one is late, gone, or started with other flags (the message says which).

    Raised by the multi-process rendezvous and barriers (:mod:`attllm_jax.evaluation.rendezvous`,
    :mod:`attllm_jax.evaluation.hosts`) and by a checkpoint restore that met a coordination failure
    (:mod:`attllm_jax.checkpoint`), so that such a failure is never reported as a corrupt file.
    """
