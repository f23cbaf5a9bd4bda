"""Scene changes between the regular frame samples, and how much of a file was left unjudged.

Regular sampling (every ``1 / fps`` seconds of a video, evenly spaced frames of a long
animation) can step over a short scene: a flash of content between two samples. Every
frame the decoder passes on the way to a sample is compared with the frame before it, on
a 32 x 32 RGB thumbnail (a cheap frame difference); a frame whose mean absolute
difference from its predecessor is at least :data:`SCENE_CHANGE` starts a new scene and is
judged too. At most ``budget`` such frames are kept per file (those with the largest
change), so a file never costs more than twice its ``max_frames``.

:func:`largest_gap` measures what sampling left out: the longest run of consecutive frames
of which none was judged; the record states it (``unsampled_gap_frames`` and, when the
frame rate or frame times are known, ``unsampled_gap_s``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

SCENE_CHANGE = 8.0
"""Mean absolute difference (0-255, over a 32 x 32 RGB thumbnail) from the previous frame
at which a frame counts as a scene change (a colour change over a seventh of the picture
scores about 16; re-encoding noise of a still scene about 1)."""

THUMB = 32

T = TypeVar("T")


def thumbnail(image: Image.Image) -> np.ndarray:
    """A 32 x 32 RGB thumbnail of ``image`` as int16 (for :func:`change`)."""
    rgb = image if image.mode == "RGB" else image.convert("RGBA").convert("RGB")
    return np.asarray(rgb.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.int16)


def change(a: np.ndarray | None, b: np.ndarray) -> float:
    """Mean absolute difference of two thumbnails (0 when there is no previous one)."""
    if a is None or a.shape != b.shape:
        return 0.0
    return float(np.abs(a - b).mean())


class SceneKeeper(Generic[T]):
    """The ``budget`` scene changes with the largest difference seen so far (one pass, bounded memory)."""

    def __init__(self, budget: int) -> None:
        self.budget = max(0, budget)
        self.seen = 0  # scene changes met, kept or not
        self._heap: list[tuple[float, int, int, T]] = []
        self._tie = itertools.count()

    def offer(self, score: float, index: int, make: Callable[[], T]) -> None:
        """Keep what ``make()`` builds for frame ``index`` if ``score`` is a scene change among the largest."""
        if score < SCENE_CHANGE:
            return
        self.seen += 1
        if self.budget == 0:
            return
        item = (score, -index, next(self._tie))
        if len(self._heap) < self.budget:
            heapq.heappush(self._heap, (*item, make()))
        elif item[:2] > self._heap[0][:2]:  # larger change, or as large and earlier
            heapq.heapreplace(self._heap, (*item, make()))

    def kept(self) -> list[tuple[int, T]]:
        """(frame index, payload) of the kept scene changes, in frame order."""
        return sorted(((-neg, payload) for _, neg, _, payload in self._heap), key=lambda x: x[0])


def largest_gap(judged: Iterable[int], count: int) -> tuple[int, int]:
    """The longest run of frames none of which was judged: (length, index of its first frame).

    ``judged`` are frame indices, ``count`` the frames the file has; (0, -1) when every frame was judged.
    """
    marks = sorted({i for i in judged if 0 <= i < count})
    best, where, prev = 0, -1, -1
    for i in [*marks, count]:
        if i - prev - 1 > best:
            best, where = i - prev - 1, prev + 1
        prev = i
    return best, where
