"""Thumbnails of kept images for the review page, within the server's pixel budget.

A thumbnail decodes only the first frame, a JPEG at reduced scale (``Image.draft``: 1/2,
1/4 or 1/8, keeping at least twice the thumbnail's side), every other format at full size
reduced right after decoding before any conversion copy is made. The route holds
:func:`thumbnail_weight` pixels of the server's :class:`~icm.serve.limits.PixelBudget`
while it decodes, as uploads do, and keeps the finished JPEGs in a small cache, so sixteen
requests for the thumbnail of one 40-megapixel PNG decode it once, one at a time.
"""

from __future__ import annotations

import collections
import io
import threading
import warnings

from PIL import Image

from icm.moderation.image_base import BACKGROUNDS, ImageLoadError, _cause, _decode
from icm.moderation.image_frames import check_frame_size
from icm.moderation.images import header_pixels
from icm.serve.limits import header_weight

THUMB_SIDE = 160
"""Thumbnails are at most this many pixels a side."""

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def thumbnail_weight(data: bytes, max_pixels: int, side: int = THUMB_SIDE) -> int:
    """Pixels decoding the thumbnail's first frame holds, from its header (0 if it cannot be read:
    make_thumbnail says why)."""
    return header_weight(data, max_pixels, lambda im: header_pixels(im, (2 * side) ** 2))


def make_thumbnail(data: bytes, max_pixels: int, name: str, side: int = THUMB_SIDE) -> bytes:
    """A JPEG of the first frame, at most ``side`` pixels a side; :class:`ImageLoadError` if refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises anything on a bad header
        raise ImageLoadError(name, f"the file header is corrupt ({_cause(exc)})") from exc
    with im, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        check_frame_size(name, im.width, im.height, max_pixels)
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - malformed EXIF: shown as stored
            orientation = 1
        if im.format == "JPEG":
            im.draft("RGB", (2 * side, 2 * side))  # decoded at 1/2, 1/4 or 1/8 scale
        _decode(im, name, "the file is truncated or corrupt")
        alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
        small: Image.Image = im
        if im.mode not in ("RGB", "RGBA", "L", "LA"):
            small = im.convert("RGBA" if alpha else "RGB")  # palettes resize badly
        small.thumbnail((side, side))  # in place: the full-size pixels are dropped here
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is not None:
        small = small.transpose(method)
    if alpha:
        rgba = small.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUNDS["white"], 255))
        background.alpha_composite(rgba)
        small = background
    buf = io.BytesIO()
    small.convert("RGB").save(buf, format="JPEG", quality=80)
    return buf.getvalue()


class ThumbnailCache:
    """The most recent thumbnails (a few kilobytes each), by image SHA-256; thread-safe."""

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
