"""Localize photos without coordinates: estimate, uncertainty, calibrated confidence, map files (issue 21)."""

from attllm_jax.localization.api import LocalizeRun, LocalizeSettings, localize
from attllm_jax.localization.results import Match, PhotoResult

__all__ = ["LocalizeRun", "LocalizeSettings", "Match", "PhotoResult", "localize"]
