"""Flooding photos by asking Gemini to edit them, through the same request policy as annotation.

The request is the paper's: the dry photo and a text asking for a realistic inundation that strictly preserves
the buildings, with an overcast sky and a few water droplets on the lens (:data:`FLOOD_EDIT_PROMPT`, versioned;
our wording, with the requested depth added). It is sent to ``POST {base_url}/{api_version}/models/{model}:
generateContent`` with ``responseModalities`` ``["TEXT", "IMAGE"]``, the key in the ``x-goog-api-key`` header (never
in the URL, never printed, logged or written), through :class:`~attllm_jax.attention.request_policy.RequestPolicy`:
the shared rate limit, retries of 408/429/5xx/timeouts/dropped connections with backoff that honours
``Retry-After`` and Google ``RetryInfo``, and key redaction of every error. An answer without an image part (a text
answer, a refusal, a blocked prompt) is an error naming what came back instead.

The returned image is resized to the input's size (bicubic). Its water mask is an ESTIMATE, not ground truth
(:func:`estimate_water_mask`): the edited image is colour-matched to the input (a per-channel gain and offset
fitted by least squares, first on the top third of the frame, then on the half of the frame it matches best;
this absorbs the overcast re-lighting), the per-pixel change is smoothed and thresholded (Otsu, at least 0.1),
and each column's waterline is the row that best splits it into unchanged pixels above and changed ones below
(a step fit), median-filtered across columns; everything below it is water.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from attllm_jax.attention.providers.gemini import GEMINI_BASE_URL, GEMINI_KEY_VARIABLES
from attllm_jax.attention.providers.http import MAX_IMAGE_ANSWER_BYTES, guarded_client
from attllm_jax.attention.request_policy import (
    ProviderError,
    RateLimiter,
    Redactor,
    RequestPolicy,
    RetryPolicy,
    api_key_from_env,
    parse_google_retry_delay,
    parse_retry_after,
    server_delay,
)
from attllm_jax.data.images import MAX_SOURCE_PIXELS, check_source_pixels, to_rgb8

DEFAULT_EDIT_MODEL = "gemini-2.5-flash-image"
DEFAULT_BASE_URL = GEMINI_BASE_URL
MASK_NOTE = (
    "ESTIMATED, not ground truth: the edit colour-matched to the dry photo (per-channel gain and offset, least "
    "squares, first on the top third of the frame, then on the best-matching half), the change smoothed and "
    "thresholded (Otsu, at least 0.1), per column the waterline that best splits unchanged pixels above from "
    "changed ones below (a step fit), median-filtered across columns"
)


@dataclass(frozen=True)
class EditPrompt:
    """A versioned image-editing prompt.

    Attributes:
        id: Recorded in the flood summary.
        version: Bumped whenever the wording changes.
        template: The text, with ``{severity}`` and ``{percent}`` to fill in.
    """

    id: str
    version: str
    template: str

    def render(self, level: float) -> str:
        """The text for one water level (fraction of the frame height at the deepest)."""
        severity = "slight" if level <= 0.25 else "moderate" if level <= 0.5 else "severe"
        return self.template.format(severity=severity, percent=round(100 * level))


FLOOD_EDIT_PROMPT = EditPrompt(
    id="gemini_flood_edit",
    version="1",
    template=(
        "Edit this street-level photo to simulate a realistic {severity} inundation of the street: muddy "
        "floodwater covering the lower part of the frame, reaching about {percent}% of the image height at its "
        "deepest, with natural reflections and ripples. Strictly preserve all original buildings, facades, signs, "
        "street furniture and the camera viewpoint; do not add, remove or move any structure. Make the sky "
        "overcast and add a few water droplets on the lens. Return only the edited photo."
    ),
)


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


@dataclass(frozen=True)
class EditedImage:
    """One successful edit.

    Attributes:
        image: The edited photo, RGB, at the input's size.
        returned_size: ``(width, height)`` of the image the model returned.
        model: The model that answered.
        attempts: Requests made (1 = no retry).
        text: Any text the model returned next to the image (redacted).
    """

    image: Image.Image
    returned_size: tuple[int, int]
    model: str
    attempts: int
    text: str


class GeminiImageEditor:
    """Asks a Gemini image model to flood photos (see the module docstring).

    Args:
        model: The image model.
        base_url: The API root (default Google's; a local server for tests or a proxy).
        api_version: REST API version.
        timeout_s: The total deadline of each attempt, seconds (connect to last byte).
        retry: Retry policy.
        limiter: Rate limiter shared by all threads.
        prompt: The editing prompt.
        api_key: The key (default: ``GEMINI_API_KEY`` or ``GOOGLE_API_KEY``); optional with a ``base_url``.
        max_response_bytes: The largest answer accepted (a larger one is refused, not retried).

    Raises:
        ValueError: without a key for Google's endpoint.
    """

    name = "gemini"

    def __init__(
        self,
        model: str = DEFAULT_EDIT_MODEL,
        base_url: str | None = None,
        api_version: str = "v1beta",
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        limiter: RateLimiter | None = None,
        prompt: EditPrompt = FLOOD_EDIT_PROMPT,
        api_key: str | None = None,
        max_response_bytes: int = MAX_IMAGE_ANSWER_BYTES,
    ):
        self.model = model
        self.prompt = prompt
        self.api_key = api_key or api_key_from_env(GEMINI_KEY_VARIABLES)
        if not self.api_key and base_url is None:
            raise ValueError(f"set {' or '.join(GEMINI_KEY_VARIABLES)} (or give --base_url for a local server)")
        self.url = f"{(base_url or DEFAULT_BASE_URL).rstrip('/')}/{api_version}/models/{model}:generateContent"
        self.timeout_s = float(timeout_s)
        self.policy = RequestPolicy(retry, limiter)
        self.redactor = Redactor([self.api_key])
        self._client = guarded_client(self.url, self.timeout_s, max_response_bytes)  # sends only to base_url's origin

    def edit(
        self, image: Image.Image, level: float, label: str = "image", stop: threading.Event | None = None
    ) -> EditedImage:
        """Floods one photo.

        Raises:
            ProviderError: when no image came back (after the retries the failure allows); never holds the key.
            Interrupted: if ``stop`` is set while waiting.
        """
        body = {
            "contents": [
                {
                    "role": "user",
                    "parts": [
                        {"text": self.prompt.render(level)},
                        {"inlineData": {"mimeType": "image/jpeg", "data": base64.b64encode(_jpeg(image)).decode()}},
                    ],
                }
            ],
            "generationConfig": {"responseModalities": ["TEXT", "IMAGE"]},
        }
        (edited, model, text), attempts = self.policy.send(
            lambda: self._attempt(body), redactor=self.redactor, label=label, stop=stop
        )
        returned = edited.size
        if edited.size != image.size:
            edited = edited.resize(image.size, Image.Resampling.BICUBIC)
        return EditedImage(edited, returned, self.redactor(model), attempts, self.redactor(text))

    def _attempt(self, body: dict) -> tuple[Image.Image, str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["x-goog-api-key"] = self.api_key
        try:
            response = self._client.post(self.url, headers=headers, content=json.dumps(body))
        except httpx.TimeoutException as e:
            raise ProviderError(
                f"request timed out after {self.timeout_s:g} s ({type(e).__name__})", retriable=True
            ) from None
        except httpx.TransportError as e:
            raise ProviderError(f"connection failed: {type(e).__name__}: {e}", retriable=True) from None
        if response.status_code != 200:
            raise _http_error(response)
        try:
            payload = response.json()
        except ValueError:
            raise ProviderError(f"the answer is not JSON: {response.text!r}") from None
        return _image_from_answer(payload)

    def close(self) -> None:
        """Closes the HTTP connections (also on leaving a ``with`` block)."""
        self._client.close()

    def __enter__(self) -> GeminiImageEditor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _http_error(response: httpx.Response) -> ProviderError:
    try:
        body = response.json()
    except ValueError:
        body = None
    message = response.text
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message", message))
    status = response.status_code
    delay = server_delay(parse_retry_after(response.headers.get("Retry-After")), parse_google_retry_delay(body))
    return ProviderError.from_status(f"HTTP {status}: {message}", status, delay)


def _image_from_answer(payload: dict) -> tuple[Image.Image, str, str]:
    """The first image part of a generateContent answer, its model and its text; ProviderError when none."""
    model = str(payload.get("modelVersion") or "unknown")
    candidates = payload.get("candidates") or []
    texts: list[str] = []
    for candidate in candidates[:1]:
        for part in (candidate.get("content") or {}).get("parts") or []:
            inline = part.get("inlineData") or part.get("inline_data")
            if isinstance(inline, dict) and str(inline.get("mimeType", inline.get("mime_type", ""))).startswith(
                "image/"
            ):
                data = str(inline.get("data", ""))
                try:
                    raw = base64.b64decode(
                        data + "=" * (-len(data) % 4), altchars=b"-_" if "-" in data or "_" in data else None
                    )
                    with Image.open(io.BytesIO(raw)) as image:
                        check_source_pixels("the edited image", image.size, MAX_SOURCE_PIXELS)  # before decoding
                        image.load()
                        edited = to_rgb8(image)
                except (ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
                    raise ProviderError(f"the image part cannot be decoded: {e}") from None
                return edited, model, "\n".join(texts)
            if "text" in part:
                texts.append(str(part["text"]))
    block = (payload.get("promptFeedback") or {}).get("blockReason")
    if block:
        raise ProviderError(f"the prompt was blocked ({block}); no image returned")
    finish = candidates[0].get("finishReason") if candidates else None
    said = " ".join(texts).strip()
    if said:
        raise ProviderError(f"the model answered text instead of an image: {said!r}")
    raise ProviderError(f"the answer holds no image (finish reason {finish})")


def estimate_water_mask(original: np.ndarray, edited: np.ndarray, min_threshold: float = 0.1) -> np.ndarray:
    """An ESTIMATE of where an edit added water (see the module docstring for the method).

    Args:
        original: ``[H, W, 3]`` uint8, the dry photo.
        edited: ``[H, W, 3]`` uint8, the edited photo at the same size.
        min_threshold: Lowest change (in [0, 1] units, after colour matching) counted as water.

    Returns:
        ``[H, W]`` bool: below an estimated waterline per column.
    """
    if original.shape != edited.shape:
        raise ValueError(f"original {original.shape} and edited {edited.shape} differ in shape")
    h, w, _ = original.shape
    a = original.reshape(-1, 3).astype(np.float64) / 255.0
    b = edited.reshape(-1, 3).astype(np.float64) / 255.0
    fit = np.arange(h * w) < (h // 3) * w  # first fit: the top third of the frame, where water rarely reaches
    matched = b
    for _ in range(3):  # then refit on the half of the frame that the colour match explains best
        matched = np.empty_like(b)
        for c in range(3):  # edited ~ gain * original + offset: undo it on the edited image
            gain, offset = np.polyfit(a[fit, c], b[fit, c], 1)
            matched[:, c] = (b[:, c] - offset) / gain if abs(gain) > 1e-3 else b[:, c]
        residual = np.abs(matched - a).mean(axis=1)
        fit = residual <= np.median(residual)
    change = np.abs(matched - a).mean(axis=1).reshape(h, w)
    radius = max(1.0, 0.01 * min(h, w))
    smooth = (
        np.asarray(
            Image.fromarray(np.clip(change * 255, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius)),
            np.float64,
        )
        / 255.0
    )
    changed = smooth > max(min_threshold, _otsu(smooth))
    # per column, the step "dry above row y, water from y down" that best fits the changed pixels: y maximizes
    # sum over rows r >= y of (changed - 1/2); no water when no step scores above zero
    score = np.cumsum((changed.astype(np.float64) - 0.5)[::-1], axis=0)[::-1]
    waterline = np.where(score.max(0) > 0, np.argmax(score, axis=0), h)
    window = max(1, (w // 20) | 1)
    padded = np.pad(waterline, window // 2, mode="edge")
    waterline = np.array([np.median(padded[x : x + window]) for x in range(w)])
    return np.arange(h)[:, None] >= waterline[None, :]


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centers)
    total = m0[-1]
    between = (total * w0 - m0) ** 2 / np.maximum(w0 * (1 - w0), 1e-12)
    return float(centers[int(np.argmax(between))])


def gemini_method(
    editor: GeminiImageEditor, stop: threading.Event | None = None, estimate_mask: bool = True
) -> Callable:
    """The Gemini edit as a :data:`~attllm_jax.data.flood.FloodMethod` (mask estimated, or left out)."""
    from attllm_jax.data.flood import FloodOutput

    def method(image: Image.Image, rel: str, level: float) -> FloodOutput:
        result = editor.edit(image, level, label=rel, stop=stop)
        pixels = np.asarray(result.image, dtype=np.uint8)
        mask = estimate_water_mask(np.asarray(image, dtype=np.uint8), pixels) if estimate_mask else None
        return FloodOutput(
            pixels, mask, {"requests": result.attempts, "resized": int(result.returned_size != image.size)}
        )

    return method
