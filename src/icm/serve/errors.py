"""Errors the server answers with: an HTTP status, a stable code and a plain message."""

from __future__ import annotations

from icm.moderation.images import ImageLoadError


class APIError(Exception):
    """Rendered as ``{"error": code, "detail": message}`` with ``status`` (on ``/v1/moderations``
    as OpenAI's ``{"error": {"message", "type", "param", "code"}}``; ``param`` names the
    request field at fault there)."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None, *, param: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}
        self.param = param


class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413, "body_too_large", f"the request body is over the server's limit of {limit:,} bytes"
        )


def image_error(exc: ImageLoadError) -> APIError:
    """The status code and code for an image the loader refused, with its message."""
    cause = exc.cause
    low = cause.lower()
    if "empty" in low:
        return APIError(422, "empty_image", f"the image is empty: {cause}")
    if "decompression bomb" in low or "megapixels" in low:
        return APIError(413, "too_many_pixels", cause)
    if "byte limit" in low or "-byte limit" in low:
        return APIError(413, "image_too_large", cause)
    if low.startswith("not an image") or low.startswith("not a supported image") or "unsupported colour mode" in low:
        return APIError(415, "not_an_image", cause)
    if "truncated" in low or "corrupt" in low:
        return APIError(422, "corrupt_image", cause)
    if "no such file" in low:
        return APIError(404, "no_such_file", cause)
    return APIError(422, "unreadable_image", cause)
