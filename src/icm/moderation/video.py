"""Video files (mp4, webm, mov, mkv) as sampled frames, through PyAV (the ``[video]`` extra).

A video is judged like a multi-frame image: frames are taken every ``1 / fps`` seconds
and at the last frame and, when that gives more than ``max_frames``, evenly spaced over
the whole duration (the first and the last frame included), so the end of a video is seen
as surely as its start. Every frame decoded on the way to a sample is compared with the
one before it: a scene change (:mod:`icm.moderation.scenes`) is judged too, at most
``max_frames`` such, so that a short scene between two samples is seen. :func:`load_video` returns a :class:`~icm.moderation.images.LoadedImage`
whose views carry each frame's index in the stream and its timestamp in seconds; the
engine judges every view and keeps the worst.

Decoding is bounded: each frame must be within the per-frame pixel limit (checked
from the stream header, before decoding), the kept frames within the total pixel
limit, and the frames decoded to reach them within :data:`MAX_DECODED_PIXELS`
(long gaps between samples are crossed by seeking to the previous key frame).

:func:`load_media` picks the loader from the file's extension and first bytes, which
is what the engine uses for paths.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import stat
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from icm.moderation.image_frames import shrink
from icm.moderation.images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_TOTAL_PIXELS,
    VIDEO_EXTENSIONS,
    FrameView,
    ImageLoadError,
    LoadedImage,
    _cause,
    _check_frame_size,
    decode_errors,
    load_image,
    open_regular_file,
    sample_frames,
)
from icm.moderation.scenes import SCENE_CHANGE, THUMB, SceneKeeper, change, largest_gap

DEFAULT_FPS = 1.0
"""Frames sampled per second of video by default."""

MAX_DECODED_PIXELS = 8_000_000_000
"""Pixels decoded per video at most (about 4,000 frames of 1080p), to reach the sampled ones."""

SEEK_GAP_SECONDS = 2.0
"""A gap between samples longer than this is crossed by seeking instead of decoding."""

INSTALL_HINT = "reading video needs PyAV, which is not installed: pip install 'icm-assistant[video]'"

# Brands of ISO-BMFF files that are still images, not videos (handled by the image loader).
_STILL_BRANDS = (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"avis", b"hevc", b"heim", b"heis")


def is_video(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a video: by its extension, else by its first bytes (MP4/MOV, Matroska/WebM)."""
    if os.path.splitext(os.fspath(path))[1].lower() in VIDEO_EXTENSIONS:
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return _video_signature(head)


def _video_signature(head: bytes) -> bool:
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska / WebM
        return True
    return head[4:8] == b"ftyp" and head[8:12] not in _STILL_BRANDS


def load_media(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    fps: float = DEFAULT_FPS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_total_pixels: int | None = None,
) -> LoadedImage:
    """A still, multi-frame or video file as a :class:`LoadedImage`, or :class:`ImageLoadError`."""
    if is_video(path):
        return load_video(path, fps=fps, max_frames=max_frames, max_pixels=max_pixels, max_total_pixels=max_total_pixels)
    return load_image(path, max_pixels=max_pixels, max_bytes=max_bytes, max_frames=max_frames,
                      max_total_pixels=max_total_pixels)


def _import_av(source: str) -> Any:
    try:
        import av
    except ImportError as exc:
        raise ImageLoadError(source, INSTALL_HINT) from exc
    return av


def _open_digest(path: Path, source: str) -> tuple[Any, str, int]:
    """The file opened (regular files only, see :func:`open_regular_file`), its sha256 and size."""
    fd, _ = open_regular_file(path, source)
    fh = os.fdopen(fd, "rb")
    h, n = hashlib.sha256(), 0
    try:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
        fh.seek(0)
    except OSError as exc:
        fh.close()
        raise ImageLoadError(source, f"the file could not be read ({_cause(exc)})") from exc
    return fh, h.hexdigest(), n


def sample_times(duration: float, fps: float, max_frames: int) -> list[float]:
    """Seconds at which frames are taken: every ``1/fps`` and at ``duration`` (the last frame's
    start), thinned evenly to ``max_frames`` (the first and the last kept)."""
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    end = max(0.0, duration)
    times = [i / fps for i in range(math.floor(end * fps + 1e-9) + 1)]
    if end - times[-1] > 1e-6:
        times.append(round(end, 6))  # the last frame is always judged
    return [times[i] for i in sample_frames(len(times), max_frames)]


def load_video(
    path_or_bytes: str | os.PathLike[str] | bytes,
    *,
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_total_pixels: int | None = None,
    name: str | None = None,
) -> LoadedImage:
    """Sample a video's frames as views (index and timestamp each), or raise :class:`ImageLoadError`."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be a positive number, got {fps}")
    stream: Any
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        source = name or "<bytes>"
        av = _import_av(source)
        digest, n_bytes = hashlib.sha256(data).hexdigest(), len(data)
        stream = io.BytesIO(data)
    else:
        source = name or os.fspath(path_or_bytes)
        av = _import_av(source)
        # av reads the descriptor checked to be a regular file, not the path a second time
        stream, digest, n_bytes = _open_digest(Path(path_or_bytes), source)
    if n_bytes == 0:
        stream.close()
        raise ImageLoadError(source, "the file is empty (0 bytes)")
    total_limit = max(max_total_pixels or DEFAULT_MAX_TOTAL_PIXELS, max_pixels)
    try:
        try:
            container = av.open(stream, mode="r")
        except Exception as exc:  # PyAV's errors and FFmpeg's: this file's error, never the batch's
            raise ImageLoadError(source, f"not a readable video ({_cause(exc)})") from exc
        try:
            with decode_errors(source, "the video is corrupt or truncated"):
                return _sample(container, source, digest, n_bytes, fps, max_frames, max_pixels, total_limit)
        finally:
            container.close()
    finally:
        stream.close()


def _duration(container: Any, stream: Any) -> float | None:
    """Seconds of the video stream: from the stream, else the container, else its packets."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _last_packet_time(container: Any, stream: Any) -> float | None:
    """End of the last packet of ``stream`` (demuxing only, no decoding)."""
    end = None
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = t if end is None else max(end, t)
    container.seek(0)
    return end


_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def _upright(frame: Any, notes: list[str]) -> Image.Image:
    """The frame as RGB, turned as the video's display matrix says (phones store portrait video sideways)."""
    image = frame.to_image()
    rotation = round(getattr(frame, "rotation", 0) or 0) % 360  # counter-clockwise, as PIL's
    method = _ROTATIONS.get(rotation)
    if method is not None:
        image = image.transpose(method)
        note = f"turned {rotation} degrees counter-clockwise, as the video's display matrix says"
        if note not in notes:
            notes.append(note)
    return image


def _sample(
    container: Any, source: str, digest: str, n_bytes: int, fps: float, max_frames: int, max_pixels: int, total_limit: int
) -> LoadedImage:
    if not container.streams.video:
        raise ImageLoadError(source, "the file has no video stream")
    stream = container.streams.video[0]
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise ImageLoadError(source, "the video stream states no frame size")
    _check_frame_size(source, width, height, max_pixels, " (video frame)")
    notes: list[str] = []
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
    duration = _duration(container, stream)
    if duration is None:
        end = _last_packet_time(container, stream)
        duration = max(0.0, end - start) if end is not None else 0.0
        notes.append("the video states no duration: measured from its packets")
    rate: Fraction | None = stream.average_rate or stream.guessed_rate
    count = int(stream.frames or 0) or (round(duration * float(rate)) if rate else 0)
    # Never sample past the last frame: the last sample time is at most the last frame's start.
    last_frame_start = max(0.0, duration - (1.0 / float(rate) if rate else 0.0))
    targets = sample_times(last_frame_start, fps, max_frames)
    if len(targets) * width * height > total_limit:
        raise ImageLoadError(
            source,
            f"refused to keep {len(targets)} frames of {width}x{height}: over the limit of "
            f"{total_limit / 1e6:.0f} megapixels (lower --max-frames)",
        )

    views: list[FrameView] = []
    # frames that change the picture between samples (decoded on the way anyway), judged too
    room = total_limit // (width * height) - len(targets)
    keeper: SceneKeeper[FrameView] = SceneKeeper(min(max_frames, max(0, room)))
    previous = None  # thumbnail of the frame decoded just before (None after a seek)
    kept_most = len(targets) + keeper.budget
    share = max(1, max_pixels // kept_most)  # the kept frames hold at most max_pixels together

    def kept(frame: Any) -> Image.Image:
        image = _upright(frame, notes)
        small = shrink(image, share)
        note = (f"frames reduced from {image.width}x{image.height} to {small.width}x{small.height} "
                f"(the {kept_most} that may be kept hold at most {max_pixels / 1e6:g} megapixels together)")
        if small is not image and note not in notes:
            notes.append(note)
        return small

    decoded = 0
    frame_px = width * height
    pending = list(targets)
    position: float | None = None  # time of the last decoded frame

    def index_of(t: float, seq: int | None) -> int:
        return round((t - start) * float(rate)) if rate else (seq if seq is not None else len(views))

    seq: int | None = 0  # exact frame counter while decoding from the start without seeking
    tolerance = 0.5 / float(rate) if rate else 1e-3  # a sample at t takes the frame shown at t
    decoding = iter(container.decode(stream))
    while pending:
        target = pending[0]
        if position is not None and target - position > SEEK_GAP_SECONDS and stream.time_base:
            container.seek(int((target + start) / stream.time_base), stream=stream, backward=True, any_frame=False)
            decoding = iter(container.decode(stream))
            seq, previous = None, None
        for frame in decoding:
            decoded += frame_px
            if decoded > MAX_DECODED_PIXELS:
                raise ImageLoadError(
                    source, f"refused: reaching the sampled frames needs over {MAX_DECODED_PIXELS / 1e9:.0f} "
                    "gigapixels decoded (too few key frames for its length)")
            t = (float(frame.time) if frame.time is not None else (position or 0.0)) - start
            position = t
            this_seq = seq
            if seq is not None:
                seq += 1
            current = np.asarray(frame.reformat(width=THUMB, height=THUMB, format="rgb24").to_ndarray(), dtype=np.int16)
            score, previous = change(previous, current), current
            if t + tolerance < target:
                if score >= SCENE_CHANGE:
                    _check_frame_size(source, frame.width, frame.height, max_pixels, " (video frame)")
                    at = index_of(t, this_seq)

                    def scene_view(f: Any = frame, t: float = t, i: int = at) -> FrameView:
                        return FrameView(kept(f), frame=i, timestamp=round(t, 3), scene=True)

                    keeper.offer(score, at, scene_view)
                continue
            _check_frame_size(source, frame.width, frame.height, max_pixels, " (video frame)")
            views.append(FrameView(kept(frame), frame=index_of(t, this_seq), timestamp=round(t, 3)))
            while pending and pending[0] <= t + tolerance:
                pending.pop(0)
            break
        else:
            break  # the stream ended before the remaining sample times (duration overstated)
    if not views:
        raise ImageLoadError(source, "the video has no decodable frame")
    if pending:
        notes.append(f"the stream ended at {position or 0.0:.2f}s, before the last {len(pending)} sample time(s)")
    regular = len(views)
    taken = {v.frame for v in views}
    views = sorted(views + [v for _, v in keeper.kept() if v.frame not in taken], key=lambda v: v.frame)
    total = max(count, views[-1].frame + 1)
    gap, _ = largest_gap((v.frame for v in views), total)
    gap_s = round(gap / float(rate), 3) if rate else None
    thinned = len(targets) < len(sample_times(last_frame_start, fps, 1 << 30))
    notes.append(
        f"video ({duration:.2f}s" + (f", {float(rate):.3g} fps, about {count} frames" if rate else "") + f"): "
        f"{regular} frames judged, sampled at {fps:g} per second and at the last frame"
        + (f", thinned to {max_frames} evenly spaced over the whole video" if thinned else "")
        + (f"; {len(views) - regular} more at scene changes ({keeper.seen} met)" if keeper.seen else "")
        + f"; the longest run not judged is {gap} frames" + (f" ({gap_s:g}s)" if gap_s is not None else "")
    )
    first = views[0].image
    return LoadedImage(
        image=first,
        source=source,
        sha256=digest,
        n_bytes=n_bytes,
        width=first.width,
        height=first.height,
        mode="video",
        format=(container.format.name or "video").split(",")[0],
        frames=max(count, len(views)),
        notes=notes,
        views=views,
        frames_seen=len(views),
        gap_frames=gap,
        gap_s=gap_s,
    )
