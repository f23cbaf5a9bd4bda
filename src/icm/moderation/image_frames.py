"""Frames of one image file: which are judged, what decoding them costs, and their RGB views.

One pixel budget covers every frame. Before any pixel is decoded, :func:`plan_frames` reads
what each frame will allocate from that frame's *own* header (a GIF canvas grows with each
frame's extent, a TIFF page or MPO picture has its own size), so a file whose first frame is
1x1 and whose later frames are 6000x6000 is budgeted by its later frames, not its first.
:func:`frame_views` then decodes within that budget, checking each frame again as it is
reached (a header the plan misread still cannot pass the limit), and keeps the views small:
the views of one file hold at most ``max_pixels`` together (a still image without
transparency is never reduced by this), and at most ``max_view_pixels`` each. An animation
is decoded one frame at a time, in order, and every frame on the way is compared with the
one before it: a scene change between the sampled frames (:mod:`icm.moderation.scenes`) is
judged too, and its views count in the same shares.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from PIL import Image

from icm.moderation.colour import to_rgb_views
from icm.moderation.image_base import FrameView, ImageLoadError, _cause, _decode, shrink
from icm.moderation.scenes import SCENE_CHANGE, SceneKeeper, change, thumbnail

__all__ = [
    "RANDOM_ACCESS_FORMATS", "FramePlan", "check_budget", "check_frame_size", "frame_views", "plan_frames",
    "sample_frames", "shrink", "to_rgb_views",
]

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
    scenes: int = 0
    """Scene changes that may be judged besides ``wanted`` (an animation decoded in order
    offers every frame on the way; :mod:`icm.moderation.scenes`)."""

    @property
    def total_pixels(self) -> int:
        return sum(w * h for w, h in self.decoded.values())

    @property
    def largest(self) -> tuple[int, int]:
        return max(self.decoded.values(), key=lambda s: s[0] * s[1])

    def view_share(self, max_pixels: int, max_view_pixels: int | None = None) -> int:
        """Pixels each judged frame's views may keep: ``max_pixels`` shared by every frame that
        may be kept (the sampled ones and the scene changes), at most ``max_view_pixels``."""
        share = max(1, max_pixels // (len(self.wanted) + self.scenes))
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
    return FramePlan(frames, wanted, decoded, scenes=len(wanted) if frames > len(wanted) else 0)


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
    starts: list[float] | None = None,
) -> list[FrameView]:
    """Decode the frames of ``plan`` within the pixel budget, as views of at most their share.

    The first frame is already decoded. Sequential formats (GIF, APNG, WebP) are stepped one
    frame at a time, each frame's canvas read from its header (after ``seek``) and charged
    before it is decoded; every frame is visited, and one that changes the picture
    (:mod:`icm.moderation.scenes`) is judged too, at most ``plan.scenes`` such. GIF and APNG
    that state frame durations get timestamps, and ``starts`` the start time of every frame
    and the end; WebP states each frame's time itself.
    """
    views: list[FrameView] = []
    frames, wanted = plan.frames, plan.wanted
    share = plan.view_share(max_pixels, max_view_pixels)
    sequential = im.format not in RANDOM_ACCESS_FORMATS
    stepped = frames > 1 and im.format in ("GIF", "PNG") and isinstance(im.info.get("duration"), (int, float))
    keeper: SceneKeeper[list[FrameView]] = SceneKeeper(plan.scenes if sequential else 0)
    todo = set(wanted)
    clock = 0.0  # milliseconds at the start of frame ``at`` (stepped formats)
    spent, at = im.width * im.height, 0
    previous = thumbnail(im) if keeper.budget else None
    for k in range(wanted[-1] + 1) if sequential and frames > 1 else wanted:
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
        if starts is not None and stepped:
            starts.append(clock / 1000)
        timestamp: float | None = None
        if stepped:
            timestamp = round(clock / 1000, 3)
        elif im.format == "WEBP" and frames > 1 and isinstance(im.info.get("timestamp"), (int, float)):
            timestamp = round(float(im.info["timestamp"]) / 1000, 3)
        score = 0.0
        if keeper.budget:
            current = thumbnail(im)
            score, previous = change(previous, current), current
        if k not in todo and score < SCENE_CHANGE:
            continue

        def judged(k: int = k, timestamp: float | None = timestamp) -> list[FrameView]:
            frame: Image.Image = im.transpose(transpose) if transpose is not None else im
            return [FrameView(rgb, frame=k, timestamp=timestamp, background=bg, scene=k not in todo)
                    for bg, rgb in to_rgb_views(frame, source, notes, share)]

        if k in todo:
            views.extend(judged())
        else:
            keeper.offer(score, k, judged)
    if starts is not None:
        if stepped and len(starts) == frames:
            starts.append((clock + max(0.0, float(im.info.get("duration") or 0))) / 1000)
        else:
            starts.clear()  # no frame times: the gap is stated in frames only
    extra = [v for _, vs in keeper.kept() for v in vs]
    return sorted(views + extra, key=lambda v: v.frame) if extra else views


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
