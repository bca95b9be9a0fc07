"""A model wrapper with a slow preprocess, so that a kill lands part-way through an extraction (subprocess tests)."""

import time


class SlowModel:
    """Delegates everything to ``model``; ``preprocess`` first sleeps ``delay_s`` seconds."""

    def __init__(self, model, delay_s: float):
        self._model = model
        self._delay_s = delay_s

    def __getattr__(self, name):
        return getattr(self._model, name)

    def preprocess(self, image, image_size=None):
        time.sleep(self._delay_s)
        return self._model.preprocess(image, image_size=image_size)
