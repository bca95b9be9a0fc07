"""End-to-end evaluation of flood-query geo-localization across alphas (``python -m experiments.eval``)."""

from attllm_jax.evaluation.config import EvalConfig, alpha_key
from attllm_jax.evaluation.demo import random_cosplace_model
from attllm_jax.evaluation.pipeline import EvalResult, run_evaluation
from attllm_jax.retrieval.retrieve import retrieve

__all__ = ["EvalConfig", "EvalResult", "alpha_key", "random_cosplace_model", "retrieve", "run_evaluation"]
