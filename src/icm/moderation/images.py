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

from PIL import Image, ImageFile, UnidentifiedImageError

from icm.moderation import image_frames
from icm.moderation.image_base import (
    ALPHA_MIN_FRACTION,
    BACKGROUNDS,
    IMAGE_EXTENSIONS,
    MEDIA_EXTENSIONS,
    VIDEO_EXTENSIONS,
    FrameView,
    ImageLoadError,
    _cause,
    _decode,
)
from icm.moderation.image_frames import check_frame_size as _check_frame_size
from icm.moderation.image_frames import sample_frames, to_rgb_views
from icm.moderation.inputs import PathEntry, iter_image_paths, read_path_list
from icm.moderation.scenes import largest_gap

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
    gap_frames: int = 0
    """The longest run of consecutive frames none of which was judged (0: every frame judged)."""
    gap_s: float | None = None
    """That run in seconds, when frame times are known (videos, timed animations)."""

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
    max_view_pixels: int | None = None,
) -> LoadedImage:
    """Load one image as 8-bit RGB, or raise :class:`ImageLoadError`.

    ``name`` labels the image in error messages and in ``LoadedImage.source``
    (defaults to the path, or ``"<bytes>"`` for in-memory data). ``image`` is the first
    frame over white; ``views`` holds every sampled frame (at most ``max_frames``) over
    each background that matters. ``max_total_pixels`` bounds the pixels decoded over
    all frames (default :data:`DEFAULT_MAX_TOTAL_PIXELS`, at least ``max_pixels``).
    ``draft_pixels`` (the server's memory bound) lets a larger JPEG decode at 1/2, 1/4 or 1/8
    scale, keeping at least that many pixels.

    Memory is bounded by one pixel budget (see :mod:`icm.moderation.image_frames`): every
    frame decoded, including those decoded only to reach a later one, is counted by its own
    header *before* it is decoded, and the file is refused once they pass ``max_total_pixels``;
    the views kept hold at most ``max_pixels`` together (frames of a multi-frame file and the
    two backgrounds of a transparent image are reduced to their share) and at most
    ``max_view_pixels`` each (the server passes the size its model needs).
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
            image_frames.check_frame_size(source, width, height, max_pixels)
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
                frames = _count_frames(im, notes)
                plan = image_frames.plan_frames(im, data, frames, max_frames)  # headers only
                plan.check(source, max_pixels, total_limit)
                _decode(im, source, "the file is truncated or corrupt")  # first frame
                transpose = _orientation(im, notes)
                starts: list[float] | None = [] if frames > 1 else None
                views = image_frames.frame_views(
                    im, source, notes, plan, transpose, max_pixels, total_limit, max_view_pixels, starts
                )

    rgb = views[0].image
    seen = len({v.frame for v in views})
    gap_frames, gap_s = _gap(views, frames, starts)
    if frames > 1:
        kind = "multi-picture JPEG" if fmt == "MPO" else "multi-page" if fmt == "TIFF" else "animated"
        scenes = len({v.frame for v in views if v.scene})
        which = (f"all {seen} judged" if seen == frames else f"{seen - scenes} evenly spaced judged (first and last "
                 f"included)" + (f" and {scenes} at scene changes" if scenes else "") + f"; the longest run not judged "
                 f"is {gap_frames} frames" + (f" ({gap_s:g}s)" if gap_s is not None else ""))
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
        gap_frames=gap_frames,
        gap_s=gap_s,
    )


def _gap(views: list[FrameView], frames: int, starts: list[float] | None) -> tuple[int, float | None]:
    """The longest run of frames not judged, in frames and (with frame start times) seconds."""
    length, first = largest_gap((v.frame for v in views), frames)
    if length == 0 or starts is None or len(starts) <= first + length:
        return length, (0.0 if length == 0 and starts is not None else None)
    return length, round(starts[first + length] - starts[first], 3)


def jpeg_draft_scale(width: int, height: int, draft_pixels: int) -> int:
    """The scale (1, 2, 4 or 8) at which :func:`load_image` with ``draft_pixels`` decodes a
    JPEG of this size: the largest whose result still has at least ``draft_pixels`` pixels."""
    scale = 1
    while scale < 8 and (width // (scale * 2)) * (height // (scale * 2)) >= draft_pixels:
        scale *= 2
    return scale


def header_pixels(im: Image.Image, draft_pixels: int = 0) -> int:
    """Pixels of an opened image's first frame as decoded, from its header: a JPEG at the scale
    :func:`jpeg_draft_scale` gives for ``draft_pixels`` (0: full size)."""
    w, h = im.size
    if draft_pixels and im.format == "JPEG":
        scale = jpeg_draft_scale(w, h, draft_pixels)
        w, h = -(-w // scale), -(-h // scale)
    return int(w) * int(h)


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


def _count_frames(im: Image.Image, notes: list[str]) -> int:
    try:
        return max(1, int(getattr(im, "n_frames", 1)))
    except Exception as exc:  # noqa: BLE001 - later frames are not needed
        notes.append(f"could not count the frames after the first ({_cause(exc)})")
        return 1


__all__ = [
    "ALPHA_MIN_FRACTION",
    "BACKGROUNDS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_TOTAL_PIXELS",
    "IMAGE_EXTENSIONS",
    "MEDIA_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "FrameView",
    "ImageLoadError",
    "LoadedImage",
    "PathEntry",
    "_cause",
    "_check_frame_size",
    "decode_errors",
    "header_pixels",
    "iter_image_paths",
    "jpeg_draft_scale",
    "load_image",
    "open_regular_file",
    "read_path_list",
    "sample_frames",
    "to_rgb_views",
]
