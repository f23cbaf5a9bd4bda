"""Robust image loading and input expansion for a moderation batch.

A moderation batch meets whatever users upload: empty or truncated files, text files
named ``.jpg``, decompression bombs, CMYK JPEGs, 16-bit PNGs, palette images with a
transparent index, animated GIFs and phone photos whose pixels are stored sideways
with an EXIF orientation tag. :func:`load_image` turns each of these into either an
8-bit RGB :class:`PIL.Image.Image` (what every backend expects) plus a record of what
was done to it, or an :class:`ImageLoadError` that names the file and says in plain
words what is wrong, so that one bad file never stops a batch.

Decoding is strict: this module never switches ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``
on, so a truncated file is an error rather than a half-grey image that a model would
happily score as "safe" (if other code in the process switched it on, every loaded image
carries a warning note).

Every frame counts: animated GIF/WebP/APNG, multi-page TIFF and multi-picture JPEG (MPO)
are *sampled* (all frames up to ``max_frames``, evenly spaced beyond that, always the
first and the last), and an image with meaningful transparency is seen over a white and
over a black background, so that content hidden after a benign first frame, or drawn in
white on a transparent canvas, is still judged. :attr:`LoadedImage.views` holds what the
backend is asked about; the engine keeps the worst view. Decoding stays bounded: the
per-frame pixel limit applies to every frame, and the pixels decoded over all frames
(including those decoded only to reach a later frame of an animation) are bounded too.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 100_000_000
"""Largest image decoded by default: 100 megapixels, about 300 MB as 8-bit RGB.

Larger images are refused *before* decoding. Pillow's own hard limit
(``2 * Image.MAX_IMAGE_PIXELS``, about 179 megapixels by default) still applies on top.
"""

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
"""Largest file read into memory (256 MiB)."""

DEFAULT_MAX_FRAMES = 16
"""Frames judged per multi-frame image or video by default (evenly spaced beyond that)."""

DEFAULT_MAX_TOTAL_PIXELS = 400_000_000
"""Pixels decoded over all frames of one file by default (at least ``max_pixels``).

For an animation this counts every frame decoded on the way to a sampled one (GIF, APNG
and WebP frames are composited in order), so a file with many large frames is refused
rather than decoded for minutes.
"""

ALPHA_MIN_FRACTION = 0.001
"""Transparency is *meaningful* when more than this fraction of pixels is not fully opaque.

Such images are judged over a white and over a black background (the worse kept), since
content drawn in white on a transparent canvas is invisible over white.
"""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}

_RANDOM_ACCESS_FORMATS = frozenset({"TIFF", "MPO"})
"""Formats whose frames decode independently; others are decoded in order to reach a frame."""

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

# Signatures of common non-image files, for a plainer error than "cannot identify".
_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"%PDF", 0, "a PDF document, not an image"),
    (b"PK\x03\x04", 0, "a ZIP archive (or an Office document), not an image"),
    (b"\x1f\x8b", 0, "a gzip-compressed file, not an image"),
    (b"ftypheic", 4, "a HEIC image, which this Pillow installation cannot decode (install pillow-heif)"),
    (b"ftypheix", 4, "a HEIC image, which this Pillow installation cannot decode (install pillow-heif)"),
    (b"ftypmif1", 4, "a HEIF image, which this Pillow installation cannot decode (install pillow-heif)"),
    (b"ftypavif", 4, "an AVIF image, which this Pillow installation cannot decode"),
    (b"ftyp", 4, "an MP4/QuickTime video container, not a still image"),
)


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


@dataclass
class LoadedImage:
    """A decoded image ready for a backend, and what was done to get it.

    ``width``/``height`` are those of ``image`` (after EXIF orientation was applied);
    ``mode``/``format`` are the file's original colour mode and format; ``sha256`` and
    ``n_bytes`` describe the file's bytes, so results can be keyed by content.
    """

    image: Image.Image
    source: str
    sha256: str
    n_bytes: int
    width: int
    height: int
    mode: str
    format: str | None
    frames: int = 1
    """How many frames the file has (for a video, as the container states or estimated)."""
    notes: list[str] = field(default_factory=list)
    views: list[FrameView] = field(default_factory=list)
    """What is judged: every sampled frame, over each background when it has alpha.

    Empty for a LoadedImage built by hand; :meth:`judged_views` then gives ``image``.
    """
    frames_seen: int = 1
    """How many distinct frames of the file are in ``views``."""

    def judged_views(self) -> list[FrameView]:
        return self.views or [FrameView(self.image)]


def load_image(
    path_or_bytes: str | os.PathLike[str] | bytes | bytearray | memoryview,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    name: str | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_total_pixels: int | None = None,
    draft_pixels: int | None = None,
) -> LoadedImage:
    """Load one image as 8-bit RGB, or raise :class:`ImageLoadError`.

    ``name`` labels the image in error messages and in ``LoadedImage.source``
    (defaults to the path, or ``"<bytes>"`` for in-memory data). ``image`` is the first
    frame over white; ``views`` holds every sampled frame (at most ``max_frames``) over
    each background that matters. ``max_total_pixels`` bounds the pixels decoded over
    all frames (default :data:`DEFAULT_MAX_TOTAL_PIXELS`, at least ``max_pixels``).
    ``draft_pixels`` (the server's memory bound) lets a larger JPEG decode at 1/2, 1/4 or 1/8
    scale, keeping at least that many pixels.
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    total_limit = max(max_total_pixels or DEFAULT_MAX_TOTAL_PIXELS, max_pixels)
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        source = name or "<bytes>"
        if len(data) > max_bytes:
            raise ImageLoadError(source, f"the data is {len(data):,} bytes, over the {max_bytes:,}-byte limit")
    else:
        source = name or os.fspath(path_or_bytes)
        data = _read_file(Path(path_or_bytes), source, max_bytes)

    if not data:
        raise ImageLoadError(source, "the file is empty (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()

    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(source, f"refused to decode a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(source, _describe_non_image(data)) from exc
    except MemoryError as exc:
        raise ImageLoadError(source, "not enough memory to open it") from exc
    except Exception as exc:  # Pillow's plugins raise anything (SyntaxError, struct.error, ...): one image's error
        raise ImageLoadError(source, f"the file header is corrupt ({_cause(exc)})") from exc

    with decode_errors(source, "the file could not be decoded"):
        with im:
            fmt = im.format
            mode = im.mode
            width, height = im.size
            _check_frame_size(source, width, height, max_pixels)
            notes: list[str] = []
            if ImageFile.LOAD_TRUNCATED_IMAGES:
                notes.append(
                    "warning: PIL.ImageFile.LOAD_TRUNCATED_IMAGES was switched on in this process, "
                    "so a truncated file may have been decoded partially"
                )
            if draft_pixels and fmt == "JPEG" and width * height > draft_pixels:
                _draft_jpeg(im, draft_pixels, notes)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                _decode(im, source, "the file is truncated or corrupt")  # first frame
                transpose = _orientation(im, notes)
                frames = _count_frames(im, notes)
                wanted = sample_frames(frames, max_frames)
                views = _frame_views(im, source, notes, wanted, frames, transpose, max_pixels, total_limit)

    rgb = views[0].image
    seen = len({v.frame for v in views})
    if frames > 1:
        kind = "multi-picture JPEG" if fmt == "MPO" else "multi-page" if fmt == "TIFF" else "animated"
        which = f"all {seen} judged" if seen == frames else f"{seen} evenly spaced judged (first and last included)"
        notes.append(f"{kind} ({frames} frames): {which}")
    return LoadedImage(
        image=rgb,
        source=source,
        sha256=digest,
        n_bytes=len(data),
        width=rgb.width,
        height=rgb.height,
        mode=mode,
        format=fmt,
        frames=frames,
        notes=list(dict.fromkeys(notes)),
        views=views,
        frames_seen=seen,
    )


def sample_frames(count: int, max_frames: int) -> list[int]:
    """Frame indices to judge: all of ``count`` up to ``max_frames``, evenly spaced beyond.

    The first and the last frame are always included (when ``max_frames`` >= 2).
    """
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if count <= max_frames:
        return list(range(count))
    if max_frames == 1:
        return [0]
    step = max_frames - 1
    return [(i * (count - 1) + step // 2) // step for i in range(max_frames)]


def _check_frame_size(source: str, width: int, height: int, max_pixels: int, what: str = "") -> None:
    if width * height > max_pixels:
        raise ImageLoadError(
            source,
            f"refused to decode a possible decompression bomb{what}: {width}x{height} = "
            f"{width * height / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:.1f}",
        )


def jpeg_draft_scale(width: int, height: int, draft_pixels: int) -> int:
    """The scale (1, 2, 4 or 8) at which :func:`load_image` with ``draft_pixels`` decodes a
    JPEG of this size: the largest whose result still has at least ``draft_pixels`` pixels."""
    scale = 1
    while scale < 8 and (width // (scale * 2)) * (height // (scale * 2)) >= draft_pixels:
        scale *= 2
    return scale


def _draft_jpeg(im: Image.Image, draft_pixels: int, notes: list[str]) -> None:
    """Let the JPEG decoder itself decode at 1/2, 1/4 or 1/8 scale (``Image.draft``), so a
    caller that needs about ``draft_pixels`` never holds the full-size pixels (a server
    bounding its memory passes the size its model needs)."""
    scale = jpeg_draft_scale(im.width, im.height, draft_pixels)
    if scale > 1:
        before = im.size
        im.draft(None, (im.width // scale, im.height // scale))
        if im.size != before:
            notes.append(f"decoded at reduced scale {im.width}x{im.height} (from {before[0]}x{before[1]})")


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


def _frame_views(
    im: Image.Image,
    source: str,
    notes: list[str],
    wanted: list[int],
    frames: int,
    transpose: Image.Transpose | None,
    max_pixels: int,
    total_limit: int,
) -> list[FrameView]:
    """Decode the ``wanted`` frames (ascending) within the pixel budget, as views.

    Animations that state frame durations get timestamps: GIF and APNG are stepped
    through frame by frame (what Pillow does inside ``seek`` anyway) adding up the
    durations; WebP states each frame's start time itself.
    """
    views: list[FrameView] = []
    canvas = im.width * im.height
    sequential = im.format not in _RANDOM_ACCESS_FORMATS
    stepped = frames > 1 and im.format in ("GIF", "PNG") and isinstance(im.info.get("duration"), (int, float))
    clock = 0.0  # milliseconds at the start of frame ``at`` (stepped formats)
    spent, at = canvas, 0
    for k in wanted:
        if k != at:
            if sequential:  # frames at+1 .. k are all decoded on the way
                spent += (k - at) * canvas
                _check_budget(source, spent, total_limit, frames, len(wanted))
            try:
                if stepped:
                    for f in range(at + 1, k + 1):
                        clock += max(0.0, float(im.info.get("duration") or 0))  # frame f-1's duration
                        im.seek(f)
                else:
                    im.seek(k)
            except EOFError as exc:
                raise ImageLoadError(
                    source, f"frame {k} of the {frames} the file declares is missing (truncated or corrupt file)"
                ) from exc
            except MemoryError as exc:
                raise ImageLoadError(source, "not enough memory to decode it") from exc
            except Exception as exc:  # any decoder failure is this image's error, never the batch's
                raise ImageLoadError(source, f"frame {k} of {frames} is corrupt ({_cause(exc)})") from exc
            at = k
            w, h = im.size
            _check_frame_size(source, w, h, max_pixels, f" (frame {k})")
            if not sequential:
                spent += w * h
                _check_budget(source, spent, total_limit, frames, len(wanted))
            _decode(im, source, f"frame {k} of {frames} is truncated or corrupt")
        timestamp: float | None = None
        if stepped:
            timestamp = round(clock / 1000, 3)
        elif im.format == "WEBP" and frames > 1 and isinstance(im.info.get("timestamp"), (int, float)):
            timestamp = round(float(im.info["timestamp"]) / 1000, 3)
        frame: Image.Image = im.transpose(transpose) if transpose is not None else im
        for background, rgb in _to_rgb_views(frame, source, notes):
            views.append(FrameView(rgb, frame=k, timestamp=timestamp, background=background))
    return views


def _check_budget(source: str, spent: int, limit: int, frames: int, sampled: int) -> None:
    if spent > limit:
        raise ImageLoadError(
            source,
            f"refused to decode {frames} frames: judging {sampled} of them needs over {spent / 1e6:.0f} "
            f"megapixels decoded, over the limit of {limit / 1e6:.0f} (a possible decompression bomb)",
        )


def _file_kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"


def open_regular_file(path: str | os.PathLike[str], source: str) -> tuple[int, os.stat_result]:
    """Open ``path`` for reading only if it is a regular file, or raise :class:`ImageLoadError`.

    FIFOs, devices and sockets are refused *before* they are opened (opening a FIFO
    blocks until a writer appears, reading ``/dev/zero`` never ends). The file is then
    opened non-blocking and checked again on the descriptor, so a file swapped for a FIFO
    between the two checks is refused too. Returns the descriptor and its ``fstat``.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise ImageLoadError(source, "it is a directory, not a file")
            raise ImageLoadError(source, f"not a regular file ({_file_kind(st.st_mode)}): refused without opening it")
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as exc:
        raise ImageLoadError(source, "no such file") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(source, "it is a directory, not a file") from exc
    except PermissionError as exc:
        raise ImageLoadError(source, "permission denied") from exc
    except OSError as exc:
        raise ImageLoadError(source, f"the file could not be opened ({_cause(exc)})") from exc
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise ImageLoadError(source, f"the file could not be read ({_cause(exc)})") from exc
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ImageLoadError(source, f"not a regular file ({_file_kind(st.st_mode)}): refused")
    return fd, st


def _read_file(path: Path, source: str, max_bytes: int) -> bytes:
    fd, st = open_regular_file(path, source)
    with os.fdopen(fd, "rb") as fp:
        if st.st_size > max_bytes:
            raise ImageLoadError(source, f"the file is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit")
        try:
            data = fp.read(max_bytes + 1)
        except OSError as exc:
            raise ImageLoadError(source, f"the file could not be read ({_cause(exc)})") from exc
    if len(data) > max_bytes:
        raise ImageLoadError(source, f"the file is over the {max_bytes:,}-byte limit (it grew while being read)")
    return data


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@contextmanager
def decode_errors(source: str, failure: str) -> Iterator[None]:
    """Errors while decoding ``source`` (image or video frames) as :class:`ImageLoadError`: ours
    pass through, running out of memory says so, anything else is ``failure`` with its cause."""
    try:
        yield
    except ImageLoadError:
        raise
    except MemoryError as exc:
        raise ImageLoadError(source, "not enough memory to decode it") from exc
    except Exception as exc:  # the point of decode_errors: any decoder failure becomes ImageLoadError
        raise ImageLoadError(source, f"{failure} ({_cause(exc)})") from exc


def _describe_non_image(data: bytes) -> str:
    for signature, offset, what in _SIGNATURES:
        if data[offset : offset + len(signature)] == signature:
            return f"not a supported image: the file is {what}"
    head = data[:512]
    lowered = head.lstrip().lower()
    if lowered.startswith(b"<svg") or (lowered.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "not a supported image: the file is an SVG vector drawing (rasterise it first)"
    text = _as_text(head)
    if text is not None:
        preview = " ".join(text.split())[:40]
        return f"not an image: the file contains text ({preview!r}...)"
    return f"not an image: unrecognised file format (first bytes {data[:8].hex(' ')})"


def _as_text(head: bytes) -> str | None:
    """The bytes as text if they look like a text file, else ``None``."""
    for cut in range(4):  # tolerate a multi-byte character cut off at the end
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and all(ch.isprintable() or ch in "\r\n\t\f" for ch in text):
            return text
        return None
    return None


_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _orientation(im: Image.Image, notes: list[str]) -> Image.Transpose | None:
    """The transpose that makes the image upright from its EXIF orientation (applied to every frame)."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception as exc:  # noqa: BLE001 - malformed EXIF must not lose the image
        notes.append(f"EXIF orientation unreadable, image left as stored ({_cause(exc)})")
        return None
    method = _ORIENTATION_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is not None:
        notes.append(f"rotated/flipped upright from EXIF orientation {orientation}")
    return method


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


def _to_rgb_views(im: Image.Image, source: str, notes: list[str]) -> list[tuple[str | None, Image.Image]]:
    """The frame as 8-bit RGB: over white, and also over black when its alpha is meaningful."""
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        try:
            rgba = im.convert("RGBA")
        except Exception as exc:  # a mode Pillow cannot convert: this image's error
            raise ImageLoadError(source, f"unsupported colour mode {im.mode!r} ({_cause(exc)})") from exc
        alpha = np.asarray(rgba.getchannel("A"))
        clear = float((alpha < 255).mean()) if alpha.size else 0.0
        if clear > ALPHA_MIN_FRACTION:
            notes.append(
                f"transparency ({im.mode}, {clear:.1%} of pixels not opaque): judged over white and over black, "
                "the worse kept"
            )
            return [(name, _composite(rgba, colour)) for name, colour in BACKGROUNDS.items()]
        if clear > 0:
            notes.append(f"transparency ({im.mode}) composited over white ({clear:.2%} of pixels, too few to matter)")
        return [(None, _composite(rgba, BACKGROUNDS["white"]))]
    return [(None, _to_rgb(im, source, notes))]


def _composite(rgba: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*colour, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _to_rgb(im: Image.Image, source: str, notes: list[str]) -> Image.Image:
    """Any Pillow mode without transparency to 8-bit RGB."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_8bit(np.asarray(im), mode, notes), "L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(im, notes)
    try:
        return im.convert("RGB")
    except Exception as exc:  # a mode Pillow cannot convert: this image's error
        raise ImageLoadError(source, f"unsupported colour mode {mode!r} ({_cause(exc)})") from exc


def _high_depth_to_8bit(arr: np.ndarray, mode: str, notes: list[str]) -> np.ndarray:
    """16-bit, 32-bit integer or float pixels to uint8, keeping the visible range.

    Pillow's own ``convert`` clips these to 255, which turns most 16-bit images white.
    """
    values = arr.astype(np.float64)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode.startswith("I;16"):
        scaled, how = values / 257.0, "16-bit values scaled to 8 bits"
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled, how = values * 255.0, "floating-point values in [0, 1] scaled to 8 bits"
    elif lo >= 0 and hi <= 255:
        scaled, how = values, f"{mode}-mode values already in 0-255, kept"
    elif lo >= 0 and hi <= 65535:
        scaled, how = values / 257.0, f"{mode}-mode values treated as 16-bit and scaled to 8 bits"
    else:
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        how = f"{mode}-mode values in [{lo:g}, {hi:g}] stretched to 0-255"
    notes.append(how)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            if out is not None:
                notes.append("CMYK converted to sRGB with the embedded ICC profile")
                return out
        except Exception as exc:  # noqa: BLE001 - fall back to the plain conversion
            notes.append(f"embedded ICC profile unusable ({_cause(exc)})")
    notes.append("CMYK converted to RGB without colour management")
    return im.convert("RGB")


def _count_frames(im: Image.Image, notes: list[str]) -> int:
    try:
        return max(1, int(getattr(im, "n_frames", 1)))
    except Exception as exc:  # noqa: BLE001 - later frames are not needed
        notes.append(f"could not count the frames after the first ({_cause(exc)})")
        return 1


# --------------------------------------------------------------------------- inputs (icm.moderation.inputs)


def __getattr__(name: str) -> Any:
    """``PathEntry``, ``iter_image_paths`` and ``read_path_list`` moved to :mod:`icm.moderation.inputs`."""
    if name in ("PathEntry", "iter_image_paths", "read_path_list"):
        from icm.moderation import inputs

        return getattr(inputs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
