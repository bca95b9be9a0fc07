"""Attention asked on the fly (``attllm-localize --provider``): annotate's run in the background, answers streamed.

The photos' attention is asked by :func:`attllm_jax.attention.runner.annotate_folder`, the annotation run itself:
its worker threads send up to ``workers`` requests at once through the provider's request policy (retries,
backoff, the shared rate limiter), and each answer is stored in ``OUT/attention/`` exactly as ``attllm-annotate``
stores it (``<photo stem>.json``, ``annotate_summary.json``). The run goes on in a background thread while
:func:`attllm_jax.localization.api.localize` extracts and searches the photos whose answers are already stored,
so throughput is bounded by ``min(workers / LLM latency, qpm / 60, backbone rate)``, not by one LLM call at a
time. A photo whose answer is already stored (an earlier run, a killed one) is not asked again; a photo whose
request failed is skipped with the reason and asked again by the next run. Design: docs/DESIGN.md section 14.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from attllm_jax.attention import masks, prompts
from attllm_jax.attention.runner import RunConfig, Summary, annotate_folder
from attllm_jax.attention.sources import SourceSettings, make_answer_source
from attllm_jax.attention.store import attention_file_name

log = logging.getLogger("attllm_jax.localization")
ATTENTION_DIR = "attention"
PROVIDERS = ("gemini", "openai", "masks", "none")


@dataclass(frozen=True)
class AskSettings:
    """How localize asks for attention.

    Attributes:
        source: The provider and its request policy (``provider`` one of :data:`PROVIDERS`; "none" = no attention).
        city: The city named in the prompt.
        prompt: Prompt id (:data:`attllm_jax.attention.prompts.PROMPTS`; the masks source has its own).
        workers: Requests in flight at once (all within ``source.qpm``).
    """

    source: SourceSettings
    city: str = "unknown"
    prompt: str = "axis_focus"
    workers: int = 8

    def validated(self) -> AskSettings:
        """Checks the settings (one-line ValueError naming the flag)."""
        if self.source.provider not in PROVIDERS:
            raise ValueError(f"--provider must be one of {', '.join(PROVIDERS)}, got {self.source.provider!r}")
        if int(self.workers) < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.source.provider in ("gemini", "openai") and (self.city or "unknown") == "unknown":
            raise ValueError(f"--provider {self.source.provider} needs --city (the city named in the prompt)")
        if self.source.provider == "openai" and not self.source.model:
            raise ValueError("--provider openai needs --llm_model (the served model's name)")
        if self.source.provider == "masks" and not self.source.masks:
            raise ValueError("--provider masks needs --masks (the folder of water masks, <stem>.png, 255 = water)")
        self.run_config()  # the prompt id and city
        if self.asks:
            make_answer_source(self.source).close()  # a missing key, model or masks folder: before any work
        return self

    @property
    def asks(self) -> bool:
        """False for provider "none" (the photos run without attention)."""
        return self.source.provider != "none"

    def key_fields(self) -> dict:
        """What changes an answer (the rate limit, workers and endpoint do not)."""
        if not self.asks:
            return {"provider": "none"}
        config = self.run_config()
        return {
            "provider": self.source.provider,
            "model": self.source.model_name,
            "prompt": f"{config.prompt.id}/{config.prompt.version}",
            "city": self.city,
            "masks": self.source.masks,
        }

    def run_config(self) -> RunConfig:
        """The annotation run's settings."""
        prompt = masks.MASKS_PROMPT if self.source.provider == "masks" else prompts.get_prompt(self.prompt)
        return RunConfig(city=self.city or "unknown", prompt=prompt, workers=int(self.workers))


class AttentionStream:
    """Asks the attention of ``photos`` in a background annotation run; hands photos out as answers are stored.

    Args:
        images: The photos' folder.
        answers: Where the answers are stored (``OUT/attention``).
        photos: The photos (relative paths) to localize.
        ask: How to ask.

    Attributes:
        asked: Photos asked by this run, with the seconds their request took (the LLM call, retries included).
        summary: The annotation run's summary once it has ended, else None.
    """

    def __init__(self, images: str | Path, answers: str | Path, photos: list[str], ask: AskSettings):
        self.images, self.answers, self.ask = Path(images), Path(answers), ask
        self.answers.mkdir(parents=True, exist_ok=True)
        self._ready: queue.Queue = queue.Queue()
        to_ask = []
        for photo in photos:
            if (self.answers / attention_file_name(photo)).is_file():
                self._ready.put((photo, None))
            else:
                to_ask.append(photo)
        self.to_ask = to_ask
        self.pending = len(photos)
        self.asked: dict[str, float] = {}
        self.summary: Summary | None = None
        self._stop = threading.Event()
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._source = make_answer_source(ask.source) if to_ask else None
        self._thread = threading.Thread(target=self._run, name="localize-ask", daemon=True)

    def start(self) -> AttentionStream:
        log.info(
            "attention: %d photos answered already, %d to ask %s (%d at once)",
            self.pending - len(self.to_ask),
            len(self.to_ask),
            self.ask.source.provider,
            self.ask.workers,
        )
        if self.to_ask:
            self._thread.start()
        else:
            self._finished.set()
        return self

    def _run(self) -> None:
        try:
            self.summary = annotate_folder(
                self.images,
                self.answers,
                self._source,
                self.ask.run_config(),
                images=self.to_ask,
                on_image=self._on_image,
                stop=self._stop,
            )
        except BaseException as error:  # noqa: BLE001 - handed to the consumer thread, raised there
            self._error = error
        finally:
            self._finished.set()

    def _on_image(self, photo: str, error: str | None) -> None:
        self.asked[photo] = _recorded_latency(self.answers / attention_file_name(photo))
        self._ready.put((photo, error))

    def take(self, want: int, poll_s: float = 0.05) -> list[tuple[str, str | None]]:
        """Waits until ``want`` photos have their answers stored (or no other answer is coming); returns them, and
        the photos whose request failed meanwhile.

        Returns:
            ``(photo, error)`` pairs: ``error`` None when the photo's answer is stored, else why it is not
            (the photo is then skipped by this run). Empty once every photo was handed out.

        Raises:
            Whatever ended the annotation run abnormally (e.g. an unwritable answer folder).
        """
        got: list[tuple[str, str | None]] = []
        answered = 0
        while answered < want and self.pending - len(got) > 0:
            try:
                got.append(self._ready.get(timeout=poll_s))
                answered += got[-1][1] is None
                continue
            except queue.Empty:
                pass
            if self._error is not None:
                raise self._error
            if self._finished.is_set() and self._ready.empty():
                if got:
                    break
                got.extend(self._unanswered())
                break
        self.pending -= len(got)
        return got

    def _unanswered(self) -> list[tuple[str, str]]:
        """The photos the ended run never answered (it was aborted or stopped), with its reason."""
        reason = "not asked: the attention run stopped"
        if self.summary is not None and self.summary.aborted:
            reason = f"not asked: the attention run stopped ({self.summary.aborted})"
        handed = set(self.asked)
        return [(p, reason) for p in self.to_ask if p not in handed][: self.pending]

    def close(self, wait_s: float = 30.0) -> None:
        """Stops asking (answers in flight are still stored), waits up to ``wait_s`` for the run, closes the source."""
        self._stop.set()
        deadline = time.monotonic() + wait_s
        while self._thread.is_alive() and not self._finished.wait(0.2) and time.monotonic() < deadline:
            pass
        if self._source is not None:
            self._source.close()


def _recorded_latency(path: Path) -> float | None:
    """The ``latency_s`` an answer file records (the provider's call, retries and rate-limit waits included)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("latency_s")
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, int | float) else None
