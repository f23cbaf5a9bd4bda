"""Bounds on what the server holds: decoded pixels, queued memory, and requests per key.

* :class:`PixelBudget`: how many pixels may be decoded at once across all requests. A
  request reads the image's size from its header (no decoding) and waits until that many
  pixels of the budget are free, so sixteen 40-megapixel PNGs decode one or two at a time
  instead of all at once. Waiters are served first come, first served, and their number
  is bounded (more get 503).
* :func:`reduce_loaded`: right after decoding, an image larger than the model needs is
  reduced (``Image.reduce``, an integer box filter) so a queued request holds megabytes,
  not hundreds of them.
* :class:`RateLimiter`: requests per minute per API key (or per client without keys), a
  fixed one-minute window per key, answered with the ``RateLimit-*`` headers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import math
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

BYTES_PER_QUEUED_PIXEL = 4  # Pillow keeps an RGB image as 32 bits per pixel


class Overloaded(RuntimeError):
    """Too many requests are waiting for the resource; answered with 503 and Retry-After."""


class PixelBudget:
    """An asyncio semaphore weighted by pixels, first come first served.

    ``hold(pixels)`` waits until ``pixels`` (capped at the whole budget, so an image larger
    than the budget decodes alone) are free. ``peak`` is the most pixels ever held at once
    (for tests and metrics).
    """

    def __init__(self, budget: int, *, max_waiting: int = 256, max_waiting_bytes: int | None = None) -> None:
        if budget < 1:
            raise ValueError("the pixel budget must be at least 1")
        self.budget = budget
        self.max_waiting = max_waiting
        self.max_waiting_bytes = max_waiting_bytes
        self.waiting_bytes = 0  # the encoded images of the requests waiting (they hold them meanwhile)
        self.in_use = 0
        self.peak = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def weight(self, pixels: int) -> int:
        return max(1, min(int(pixels), self.budget))

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int, nbytes: int = 0) -> AsyncIterator[int]:
        """Wait for ``pixels`` of the budget; ``nbytes`` is what the waiting request holds."""
        w = self.weight(pixels)
        if self._waiters or self.in_use + w > self.budget:
            if len(self._waiters) >= self.max_waiting:
                raise Overloaded(f"{len(self._waiters)} images are already waiting to be decoded")
            if self.max_waiting_bytes is not None and self.waiting_bytes + nbytes > self.max_waiting_bytes:
                raise Overloaded(
                    f"the images waiting to be decoded hold {self.waiting_bytes / 2**20:,.0f} MiB "
                    f"(limit {self.max_waiting_bytes / 2**20:,.0f} MiB)"
                )
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (w, fut)
            self._waiters.append(entry)
            self.waiting_bytes += nbytes
            try:
                await fut
            except BaseException:
                if fut.done() and not fut.cancelled():
                    self._release(w)  # granted while being cancelled: give it back
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(entry)
                    self._wake()
                raise
            finally:
                self.waiting_bytes -= nbytes
        else:
            self._take(w)
        try:
            yield w
        finally:
            self._release(w)

    def _take(self, w: int) -> None:
        self.in_use += w
        self.peak = max(self.peak, self.in_use)

    def _release(self, w: int) -> None:
        self.in_use -= w
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            w, fut = self._waiters[0]
            if fut.done():  # cancelled
                self._waiters.popleft()
                continue
            if self.in_use + w > self.budget:
                return
            self._waiters.popleft()
            self._take(w)
            fut.set_result(None)


def decode_weight(data: bytes, max_pixels: int, draft_pixels: int = 0, max_frames: int = 16) -> int:
    """Pixels decoding ``data`` will hold at once, from its headers (no pixel is decoded).

    For a still image its width x height (for a JPEG at the reduced scale it decodes at with
    ``draft_pixels``). For a multi-frame file each frame is counted by its *own* header (see
    :func:`icm.moderation.image_frames.plan_frames`): the largest frame decoded (an animation's
    canvas, a page's own size) plus the views kept of the other judged frames (the sampled ones
    and the scene changes an animation may add), each at most its share (``draft_pixels``, the
    size the server reduces to). 0 for an image the loader
    refuses from its headers alone (a frame over ``max_pixels``, frames over the per-file
    total, or a header Pillow cannot parse).
    """
    from icm.moderation.image_frames import plan_frames
    from icm.moderation.images import DEFAULT_MAX_TOTAL_PIXELS, header_pixels

    def weigh(im: Image.Image) -> int:
        frames = int(getattr(im, "n_frames", 1) or 1)
        if frames == 1:
            return header_pixels(im, draft_pixels)
        plan = plan_frames(im, data, frames, max_frames)
        plan.check("<upload>", max_pixels, max(DEFAULT_MAX_TOTAL_PIXELS, max_pixels))
        share = plan.view_share(max_pixels, draft_pixels or None)
        lw, lh = plan.largest
        kept = sum(min(plan.decoded[k][0] * plan.decoded[k][1], share) for k in plan.wanted[1:])
        kept += plan.scenes * min(lw * lh, share)  # scene changes judged between the samples
        return lw * lh + kept

    return header_weight(data, max_pixels, weigh)


def header_weight(data: bytes, max_pixels: int, weigh: Callable[[Image.Image], int]) -> int:
    """``weigh(im)`` for the image ``data`` holds, opened for its headers only; 0 when its first
    frame is over ``max_pixels``, ``weigh`` refuses it (an ``ImageLoadError``) or Pillow cannot
    parse its header (the decode that follows says why)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return 0
                return weigh(im)
    except Exception:  # noqa: BLE001 - any header Pillow cannot parse, or one the loader refuses
        return 0


def reduce_loaded(loaded: Any, max_pixels: int) -> Any:
    """Reduce ``loaded.image`` (and each of ``loaded.views``) to at most ``max_pixels``.

    As ``Image.thumbnail``: an integer ``reduce`` (n x n block averages, cheap) first, then
    Lanczos to the exact size, aspect ratio kept. A note records the change. ``max_pixels``
    0 keeps every size.
    """
    if max_pixels <= 0:
        return loaded
    im = loaded.image
    views = list(getattr(loaded, "views", None) or [])
    if im.width * im.height <= max_pixels and all(v.image.width * v.image.height <= max_pixels for v in views):
        return loaded
    before = f"{im.width}x{im.height}"
    done: dict[int, Any] = {}  # a view may be the image itself: reduce it once
    loaded.image = done.setdefault(id(im), _shrink(im, max_pixels))
    loaded.width, loaded.height = loaded.image.width, loaded.image.height
    for v in views:
        v.image = done.get(id(v.image)) or done.setdefault(id(v.image), _shrink(v.image, max_pixels))
    loaded.notes.append(
        f"reduced from {before} to {loaded.image.width}x{loaded.image.height} for the model "
        f"(the server's limit is {max_pixels:,} pixels)"
    )
    return loaded


def _shrink(im: Any, max_pixels: int) -> Any:
    from icm.moderation.image_frames import shrink

    return shrink(im, max_pixels)


def loaded_bytes(loaded: Any) -> int:
    """Memory a decoded image holds: its pixels and those of its views."""
    ims = [loaded.image] + [v.image for v in (getattr(loaded, "views", None) or []) if v.image is not loaded.image]
    return sum(i.width * i.height * BYTES_PER_QUEUED_PIXEL for i in ims)


# --------------------------------------------------------------------------- rate limits


@dataclass(frozen=True)
class RateState:
    """One request's standing in its key's window, sent as ``RateLimit-*`` headers."""

    limit: int
    remaining: int
    reset: int  # seconds until the window ends

    def headers(self) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(self.reset),
        }


class RateLimited(Exception):
    def __init__(self, state: RateState) -> None:
        super().__init__(f"over {state.limit} requests per minute")
        self.state = state


class RateLimiter:
    """``limit`` requests per minute per key, in a fixed window that opens with the key's
    first request (as GitHub's API does per hour). Thread-safe; expired windows are dropped,
    so memory is bounded by the keys active in the last minute."""

    WINDOW = 60.0

    def __init__(self, limit: int, *, clock: Any = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._windows: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def hit(self, key: str) -> RateState:
        """Count one request for ``key``; raises :class:`RateLimited` when over the limit."""
        now = self.clock()
        with self._lock:
            if len(self._windows) > 10_000:
                self._windows = {k: v for k, v in self._windows.items() if now - v[0] < self.WINDOW}
            start, count = self._windows.get(key, (now, 0))
            if now - start >= self.WINDOW:
                start, count = now, 0
            reset = max(1, math.ceil(start + self.WINDOW - now))
            if count >= self.limit:
                raise RateLimited(RateState(self.limit, 0, reset))
            count += 1
            self._windows[key] = (start, count)
            return RateState(self.limit, self.limit - count, reset)
