"""What the image loaders share: the error they raise, a judged view, extensions and backgrounds.

Split out of :mod:`icm.moderation.images` (which re-exports every name) so that the frame,
colour and input-expansion modules can use them without an import cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

ALPHA_MIN_FRACTION = 0.001
"""Transparency is *meaningful* when more than this fraction of pixels is not fully opaque.

Such images are judged over a white and over a black background (the worse kept), since
content drawn in white on a transparent canvas is invisible over white.
"""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".dib",
     ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif",
     ".heic", ".heif"}
)
"""File extensions (lower case) picked up when a folder or glob is expanded.

HEIC/HEIF/AVIF are included so that such files are *reported* (Pillow may lack the
codec) instead of being skipped silently.
"""

VIDEO_EXTENSIONS: frozenset[str] = frozenset({".mp4", ".m4v", ".webm", ".mov", ".mkv"})
"""Video file extensions (lower case): read by :mod:`icm.moderation.video` and picked up in folders."""

MEDIA_EXTENSIONS: frozenset[str] = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS


class ImageLoadError(Exception):
    """An image could not be loaded; ``str(err)`` names the file and the cause."""

    def __init__(self, source: str, cause: str) -> None:
        self.source = source
        self.cause = cause
        super().__init__(f"cannot load image {source}: {cause}")


@dataclass
class FrameView:
    """One picture a backend judges: a frame of the file over one background."""

    image: Image.Image
    frame: int = 0
    """Index of the frame in the file (0 for a still image)."""
    timestamp: float | None = None
    """Seconds from the start (videos, and animations that state frame durations)."""
    background: str | None = None
    """``white`` or ``black`` when the frame has meaningful transparency, else None."""
    scene: bool = False
    """Judged because it starts a new scene between regular samples (:mod:`icm.moderation.scenes`)."""


def _decode(im: Image.Image, source: str, what: str) -> None:
    """``im.load()`` with every failure turned into an :class:`ImageLoadError`."""
    try:
        im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES is False)
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(source, f"refused to decode a possible decompression bomb ({exc})") from exc
    except MemoryError as exc:
        raise ImageLoadError(source, "not enough memory to decode it") from exc
    except Exception as exc:  # any decoder failure is this image's error, never the batch's
        raise ImageLoadError(source, f"{what} ({_cause(exc)})") from exc


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def shrink(im: Image.Image, max_pixels: int) -> Image.Image:
    """``im`` reduced to at most ``max_pixels`` (an integer box reduce, then Lanczos), aspect kept."""
    if im.width * im.height <= max_pixels:
        return im
    scale = math.sqrt(max_pixels / (im.width * im.height))
    size = (max(1, math.floor(im.width * scale)), max(1, math.floor(im.height * scale)))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
