"""The service's error answers: one JSON shape, one status per kind of problem (README "Run it as a service").

Every error is ``{"error": {"code": ..., "message": ...}, "request_id": ...}`` with the status of its
:class:`ServiceError`. The mapping of decoder failures (:func:`image_error`):

* not an image (PIL cannot identify it) or a truncated / corrupt one: 400;
* an image refused before decoding (more pixels than allowed: a decompression bomb) or in a pixel format without
  a defined 8-bit conversion: 422.
"""

from __future__ import annotations

from PIL import Image, UnidentifiedImageError

from attllm_jax.data.images import ImageTooLargeError


class ServiceError(Exception):
    """An answer other than 200.

    Attributes:
        status: The HTTP status.
        code: A stable machine-readable name (``"not_an_image"``, ``"queue_full"``, ...).
        message: One line naming the input and the problem.
        headers: Extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self, request_id: str | None) -> dict:
        """The JSON body."""
        return {"error": {"code": self.code, "message": self.message}, "request_id": request_id}


class BodyTooLargeError(ServiceError):
    """The request body is larger than ``--max_upload_mb``."""

    def __init__(self, limit_bytes: int):
        super().__init__(
            413,
            "upload_too_large",
            f"the request body is larger than the {limit_bytes / 2**20:g} MiB the service takes (--max_upload_mb)",
        )


def image_error(name: str, error: BaseException) -> ServiceError:
    """The answer to an upload the decoder refused or failed on (see the module notes)."""
    if isinstance(error, ImageTooLargeError | Image.DecompressionBombError):
        return ServiceError(422, "too_many_pixels", f"image {name}: {error}")
    if isinstance(error, UnidentifiedImageError):
        return ServiceError(400, "not_an_image", f"image {name} is not an image file the service can read (JPEG, PNG)")
    if isinstance(error, OSError | SyntaxError):
        return ServiceError(400, "unreadable_image", f"image {name} cannot be decoded (truncated or corrupt): {error}")
    return ServiceError(422, "unsupported_image", f"image {name}: {error}")


def field_error(message: str) -> ServiceError:
    """A missing or malformed form field (422)."""
    return ServiceError(422, "bad_field", message)


def retry_later(code: str, message: str, retry_after_s: int) -> ServiceError:
    """503 with ``Retry-After`` (a full queue, a model still loading, a shutdown)."""
    return ServiceError(503, code, message, {"Retry-After": str(retry_after_s)})
