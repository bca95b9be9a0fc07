"""Per-stage seconds of localize: a model wrapper that times the backbone and the aggregation, and percentiles.

JAX dispatches asynchronously, so a stage's time is only its own once its result is ready: :class:`TimedModel`
waits for each ``features`` / ``aggregate`` / ``aggregate_sweep`` result (``jax.block_until_ready``) before
stopping the clock. That costs the overlap of one batch's host work with the next batch's device work, which is
what makes the split honest. The extraction's remaining wall time is reading, decoding and preprocessing the
photos ("decode").
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import numpy as np

STAGES = ("attention", "decode", "backbone", "aggregation", "search")


class TimedModel:
    """Delegates everything to ``model`` (a :class:`~attllm_jax.models.vpr.DescriptorModel`); adds the seconds
    of ``features`` to ``seconds["backbone"]`` and of the aggregations to ``seconds["aggregation"]``."""

    def __init__(self, model):
        self._model = model
        self._lock = threading.Lock()
        self.seconds = {"backbone": 0.0, "aggregation": 0.0}

    def __getattr__(self, name):
        return getattr(self._model, name)

    @property
    def wrapped(self):
        """The model timed."""
        return self._model

    def take(self) -> dict[str, float]:
        """The seconds counted since the last call, and resets them."""
        with self._lock:
            seconds, self.seconds = self.seconds, {"backbone": 0.0, "aggregation": 0.0}
        return seconds

    def _timed(self, stage: str, fn, *args, **kwargs):
        import jax

        t0 = time.perf_counter()
        result = jax.block_until_ready(fn(*args, **kwargs))
        with self._lock:
            self.seconds[stage] += time.perf_counter() - t0
        return result

    def features(self, images):
        return self._timed("backbone", self._model.features, images)

    def aggregate(self, feats, attention=None, alpha=0.0):
        return self._timed("aggregation", self._model.aggregate, feats, attention, alpha)

    def aggregate_sweep(self, feats, attention, alphas):
        return self._timed("aggregation", self._model.aggregate_sweep, feats, attention, alphas)


def percentiles(values: Iterable[float]) -> dict[str, float] | None:
    """``{"p50_s", "p95_s", "n"}`` of some seconds, or None when there are none."""
    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if array.size == 0:
        return None
    return {
        "p50_s": round(float(np.percentile(array, 50)), 5),
        "p95_s": round(float(np.percentile(array, 95)), 5),
        "n": int(array.size),
    }
