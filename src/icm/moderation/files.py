"""Moderating files: what :class:`~icm.moderation.engine.Moderator` and
:class:`~icm.moderation.bundle.BundleModerator` share between paths and their records.

:func:`moderate_files` loads one batch of files (once each) and puts an error result in
place of each unreadable one; :func:`moderate_in_batches` runs a moderator over many files
batch by batch with a backend it creates (and closes) from a name, or one it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from icm.moderation.backends.base import Backend
from icm.moderation.images import DEFAULT_MAX_FRAMES, DEFAULT_MAX_PIXELS, ImageLoadError, LoadedImage
from icm.moderation.record import ModerationRecord
from icm.moderation.video import DEFAULT_FPS, load_media

T = TypeVar("T")


def moderate_files(
    paths: Sequence[str],
    moderate_loaded: Callable[[list[LoadedImage], list[float]], list[T]],
    error: Callable[[str, str], T],
    *,
    max_pixels: int | None = None,
    max_frames: int | None = None,
    fps: float | None = None,
) -> list[T]:
    """Load each file and moderate the readable ones in one call; an unreadable file gets ``error(path, message)``.

    ``moderate_loaded`` gets the loaded images and each one's load time (ms); the results
    come back in the order of ``paths``.
    """
    loaded: list[LoadedImage] = []
    load_ms: list[float] = []
    slots: list[T | int] = []
    for p in paths:
        t0 = time.perf_counter()
        try:
            im = load_media(
                p,
                max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                max_frames=max_frames or DEFAULT_MAX_FRAMES,
                fps=fps or DEFAULT_FPS,
            )
        except ImageLoadError as exc:
            slots.append(error(str(p), str(exc)))
            continue
        load_ms.append(round((time.perf_counter() - t0) * 1000, 3))
        slots.append(len(loaded))
        loaded.append(im)
    done = moderate_loaded(loaded, load_ms)
    return [done[s] if isinstance(s, int) else s for s in slots]


def moderate_in_batches(
    images: Iterable[str] | str,
    backend: Backend | str,
    backend_options: dict[str, object],
    batch_size: int,
    start: Callable[[Backend], Callable[[list[str]], Iterable[ModerationRecord]]],
) -> list[ModerationRecord]:
    """The records of ``start(backend)`` run on the files ``batch_size`` at a time, in file order.

    A backend given by name is created with ``backend_options`` and closed at the end.
    """
    from icm.moderation.backends import create_backend

    paths = [images] if isinstance(images, str) else list(images)
    owned = isinstance(backend, str)
    be = create_backend(backend, **backend_options) if isinstance(backend, str) else backend
    try:
        run = start(be)
        out: list[ModerationRecord] = []
        for i in range(0, len(paths), batch_size):
            out.extend(run(paths[i : i + batch_size]))
        return out
    finally:
        if owned:
            be.close()
