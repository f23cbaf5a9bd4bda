"""Frames of one image file: which are judged, what decoding them costs, and their RGB views.

One pixel budget covers every frame. Before any pixel is decoded, :func:`plan_frames` reads
what each frame will allocate from that frame's *own* header (a GIF canvas grows with each
frame's extent, a TIFF page or MPO picture has its own size), so a file whose first frame is
1x1 and whose later frames are 6000x6000 is budgeted by its later frames, not its first.
:func:`frame_views` then decodes within that budget, checking each frame again as it is
reached (a header the plan misread still cannot pass the limit), and keeps the views small:
the views of one file hold at most ``max_pixels`` together (a still image without
transparency is never reduced by this), and at most ``max_view_pixels`` each.
"""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from icm.moderation.image_base import (
    ALPHA_MIN_FRACTION,
    BACKGROUNDS,
    FrameView,
    ImageLoadError,
    _cause,
    _decode,
)

RANDOM_ACCESS_FORMATS = frozenset({"TIFF", "MPO"})
"""Formats whose frames decode independently; others are decoded in order to reach a frame."""

SEQUENTIAL_FORMATS = frozenset({"GIF", "PNG", "WEBP"})
"""Animations composited in order on a canvas: reaching frame k decodes frames 0..k."""


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


def check_frame_size(source: str, width: int, height: int, max_pixels: int, what: str = "") -> None:
    if width * height > max_pixels:
        raise ImageLoadError(
            source,
            f"refused to decode a possible decompression bomb{what}: {width}x{height} = "
            f"{width * height / 1e6:.1f} megapixels, over the limit of {max_pixels / 1e6:.1f}",
        )


def check_budget(source: str, spent: int, limit: int, frames: int, sampled: int) -> None:
    if spent > limit:
        raise ImageLoadError(
            source,
            f"refused to decode {frames} frames: judging {sampled} of them needs over {spent / 1e6:.0f} "
            f"megapixels decoded, over the limit of {limit / 1e6:.0f} (a possible decompression bomb)",
        )


@dataclass(frozen=True)
class FramePlan:
    """What decoding the judged frames of a file costs, read from headers only."""

    frames: int
    wanted: list[int]
    """The frames judged (ascending)."""
    decoded: dict[int, tuple[int, int]]
    """Every frame decoded to reach them, with the size (canvas) decoding it allocates."""

    @property
    def total_pixels(self) -> int:
        return sum(w * h for w, h in self.decoded.values())

    @property
    def largest(self) -> tuple[int, int]:
        return max(self.decoded.values(), key=lambda s: s[0] * s[1])

    def view_share(self, max_pixels: int, max_view_pixels: int | None = None) -> int:
        """Pixels each judged frame's views may keep: ``max_pixels`` shared by the frames,
        at most ``max_view_pixels``."""
        share = max(1, max_pixels // len(self.wanted))
        return min(share, max_view_pixels) if max_view_pixels else share

    def check(self, source: str, max_pixels: int, total_limit: int) -> None:
        """Refuse, before decoding, a frame over ``max_pixels`` or a total over ``total_limit``."""
        for k, (w, h) in sorted(self.decoded.items()):
            check_frame_size(source, w, h, max_pixels, f" (frame {k})" if k else "")
        check_budget(source, self.total_pixels, total_limit, self.frames, len(self.wanted))


def plan_frames(im: Image.Image, data: bytes, frames: int, max_frames: int) -> FramePlan:
    """The :class:`FramePlan` of an opened, not yet decoded image (its position is restored to frame 0)."""
    wanted = sample_frames(frames, max_frames)
    size = (im.width, im.height)
    if frames == 1:
        return FramePlan(frames, wanted, {0: size})
    if im.format in RANDOM_ACCESS_FORMATS:
        decoded: dict[int, tuple[int, int]] = {}
        try:
            for k in wanted:
                im.seek(k)  # reads the page's own header; decodes nothing
                decoded[k] = (im.width, im.height)
        finally:
            im.seek(0)
        return FramePlan(frames, wanted, decoded)
    upto = wanted[-1]
    canvases = _gif_canvases(data, upto) if im.format == "GIF" else None
    decoded = {}
    for k in range(upto + 1):
        decoded[k] = canvases[min(k, len(canvases) - 1)] if canvases else size
    return FramePlan(frames, wanted, decoded)


def _gif_canvases(data: bytes, upto: int) -> list[tuple[int, int]] | None:
    """The canvas each GIF frame up to ``upto`` is decoded on, as Pillow grows it to cover each
    frame's extent; None if the block structure cannot be followed (the decode-time check remains)."""
    try:
        w, h = struct.unpack_from("<HH", data, 6)
        flags = data[10]
        pos = 13 + (3 * (2 << (flags & 7)) if flags & 0x80 else 0)
        out: list[tuple[int, int]] = []
        while len(out) <= upto and pos < len(data):
            kind = data[pos]
            if kind == 0x21:  # extension: label, then data sub-blocks
                pos = _skip_blocks(data, pos + 2)
            elif kind == 0x2C:  # image descriptor
                x0, y0, fw, fh = struct.unpack_from("<4H", data, pos + 1)
                local = data[pos + 9]
                pos += 10 + (3 * (2 << (local & 7)) if local & 0x80 else 0) + 1  # + LZW code size
                pos = _skip_blocks(data, pos)
                w, h = max(w, x0 + fw), max(h, y0 + fh)
                out.append((w, h))
            else:  # the trailer, or bytes Pillow would skip
                break
        return out or None
    except (struct.error, IndexError):
        return None


def _skip_blocks(data: bytes, pos: int) -> int:
    while data[pos]:
        pos += data[pos] + 1
    return pos + 1


def frame_views(
    im: Image.Image,
    source: str,
    notes: list[str],
    plan: FramePlan,
    transpose: Image.Transpose | None,
    max_pixels: int,
    total_limit: int,
    max_view_pixels: int | None = None,
) -> list[FrameView]:
    """Decode the frames of ``plan`` within the pixel budget, as views of at most their share.

    The first frame is already decoded. Sequential formats are stepped one frame at a time,
    each frame's canvas read from its header (after ``seek``) and charged before it is decoded.
    Animations that state frame durations get timestamps: GIF and APNG add up the durations;
    WebP states each frame's start time itself.
    """
    views: list[FrameView] = []
    frames, wanted = plan.frames, plan.wanted
    share = plan.view_share(max_pixels, max_view_pixels)
    sequential = im.format not in RANDOM_ACCESS_FORMATS
    stepped = frames > 1 and im.format in ("GIF", "PNG") and isinstance(im.info.get("duration"), (int, float))
    clock = 0.0  # milliseconds at the start of frame ``at`` (stepped formats)
    spent, at = im.width * im.height, 0
    for k in wanted:
        if k != at:
            for f in range(at + 1, k + 1) if sequential else [k]:
                if stepped:
                    clock += max(0.0, float(im.info.get("duration") or 0))  # frame f-1's duration
                _seek(im, f, source, frames)  # reads frame f's header; frame f-1 is decoded on the way
                w, h = im.size
                check_frame_size(source, w, h, max_pixels, f" (frame {f})")
                spent += w * h
                check_budget(source, spent, total_limit, frames, len(wanted))
            at = k
            _decode(im, source, f"frame {k} of {frames} is truncated or corrupt")
        timestamp: float | None = None
        if stepped:
            timestamp = round(clock / 1000, 3)
        elif im.format == "WEBP" and frames > 1 and isinstance(im.info.get("timestamp"), (int, float)):
            timestamp = round(float(im.info["timestamp"]) / 1000, 3)
        frame: Image.Image = im.transpose(transpose) if transpose is not None else im
        for background, rgb in to_rgb_views(frame, source, notes, share):
            views.append(FrameView(rgb, frame=k, timestamp=timestamp, background=background))
    return views


def _seek(im: Image.Image, f: int, source: str, frames: int) -> None:
    try:
        im.seek(f)
    except EOFError as exc:
        raise ImageLoadError(
            source, f"frame {f} of the {frames} the file declares is missing (truncated or corrupt file)"
        ) from exc
    except MemoryError as exc:
        raise ImageLoadError(source, "not enough memory to decode it") from exc
    except Exception as exc:  # any decoder failure is this image's error, never the batch's
        raise ImageLoadError(source, f"frame {f} of {frames} is corrupt ({_cause(exc)})") from exc


def shrink(im: Image.Image, max_pixels: int) -> Image.Image:
    """``im`` reduced to at most ``max_pixels`` (an integer box reduce, then Lanczos), aspect kept."""
    if im.width * im.height <= max_pixels:
        return im
    scale = math.sqrt(max_pixels / (im.width * im.height))
    size = (max(1, math.floor(im.width * scale)), max(1, math.floor(im.height * scale)))
    return im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _shrunk(im: Image.Image, max_pixels: int, notes: list[str]) -> Image.Image:
    small = shrink(im, max_pixels)
    if small is not im:
        notes.append(
            f"reduced from {im.width}x{im.height} to {small.width}x{small.height} "
            f"(each view kept at most {max_pixels:,} pixels)"
        )
    return small


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "La", "RGBa"})


def to_rgb_views(
    im: Image.Image, source: str, notes: list[str], max_pixels: int | None = None
) -> list[tuple[str | None, Image.Image]]:
    """The frame as 8-bit RGB: over white, and also over black when its alpha is meaningful;
    each view reduced to at most ``max_pixels`` (shared by the two backgrounds) before it is kept."""
    limit = max_pixels or im.width * im.height
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        try:
            rgba = im.convert("RGBA")
        except Exception as exc:  # a mode Pillow cannot convert: this image's error
            raise ImageLoadError(source, f"unsupported colour mode {im.mode!r} ({_cause(exc)})") from exc
        alpha = np.asarray(rgba.getchannel("A"))
        clear = float((alpha < 255).mean()) if alpha.size else 0.0
        del alpha
        if clear > ALPHA_MIN_FRACTION:
            notes.append(
                f"transparency ({im.mode}, {clear:.1%} of pixels not opaque): judged over white and over black, "
                "the worse kept"
            )
            rgba = _shrunk(rgba, max(1, limit // 2), notes)  # Pillow resizes RGBA premultiplied
            return [(name, _composite(rgba, colour)) for name, colour in BACKGROUNDS.items()]
        if clear > 0:
            notes.append(f"transparency ({im.mode}) composited over white ({clear:.2%} of pixels, too few to matter)")
        return [(None, _composite(_shrunk(rgba, limit, notes), BACKGROUNDS["white"]))]
    if im.mode == "RGB" and im.width * im.height > limit:
        return [(None, _shrunk(im, limit, notes))]  # no full-size copy
    return [(None, _shrunk(_to_rgb(im, source, notes), limit, notes))]


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
