"""How the offline sources run: threads, the content-hash cache, and the pool they share.

* **Threads**, one setting: the ``threads`` option of the detector backend, else
  ``$ICM_THREADS``, else every core (``os.cpu_count()``). :func:`thread_plan` splits it
  into how many sources of one batch run at once (the pool) and how many intra-op threads
  each onnxruntime session gets; torch (used to export EfficientNet-Lite0 once) is given
  the whole count (:func:`apply_torch_threads`).
* **Once per image**: :class:`OutputCache` keeps what each source saw in each image, by a
  hash of the decoded pixels (:func:`image_digest`), bounded to the last
  ``$ICM_EVIDENCE_CACHE`` images (default :data:`DEFAULT_CACHE_IMAGES`; 0 turns it off).
  Several policies asking about the same image (the ``icm-standard`` bundle, a server's
  several rule sets) and a duplicate image within a job then cost each source once.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable

from PIL import Image

from icm.moderation.evidence.sources import SourceOutput

THREADS_ENV = "ICM_THREADS"
CACHE_ENV = "ICM_EVIDENCE_CACHE"
DEFAULT_CACHE_IMAGES = 256
"""Images whose source outputs are kept (an EfficientNet output is about 100 kB: 1000 class probabilities)."""

MAX_CONCURRENT_SOURCES = 4
"""At most this many sources of one batch run at once (there are four built-in sources)."""


def _positive_int(value: str, what: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{what} must be a whole number, got {value!r}")
    return n


def resolve_threads(threads: int | None = None) -> int:
    """The thread count: ``threads`` if given, else ``$ICM_THREADS``, else the CPU count."""
    if threads is None:
        env = os.environ.get(THREADS_ENV, "").strip()
        threads = _positive_int(env, f"${THREADS_ENV}") if env else (os.cpu_count() or 1)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return threads


def thread_plan(threads: int) -> tuple[int, int]:
    """``(sources at once, intra-op threads per session)`` for ``threads`` in all."""
    workers = max(1, min(threads, MAX_CONCURRENT_SOURCES))
    return workers, max(1, threads // workers)


def apply_torch_threads(threads: int) -> None:
    """Give torch the same count, when torch is loaded (it is process-wide)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def cache_size() -> int:
    env = os.environ.get(CACHE_ENV, "").strip()
    return _positive_int(env, f"${CACHE_ENV}") if env else DEFAULT_CACHE_IMAGES


_digests: dict[int, tuple[weakref.ReferenceType[Image.Image], str]] = {}
_digests_lock = threading.Lock()


def image_digest(im: Image.Image) -> str:
    """A hash of the decoded pixels (mode, size and bytes), computed once per image object."""
    key = id(im)
    with _digests_lock:
        hit = _digests.get(key)
        if hit is not None and hit[0]() is im:
            return hit[1]
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{im.mode}:{im.width}x{im.height}:".encode())
    h.update(im.tobytes())
    digest = h.hexdigest()

    def forget(_: object, key: int = key) -> None:
        with _digests_lock:
            _digests.pop(key, None)

    with _digests_lock:
        _digests[key] = (weakref.ref(im, forget), digest)
    return digest


class OutputCache:
    """Source outputs by (image digest, source key), for the last ``max_images`` images (LRU)."""

    def __init__(self, max_images: int | None = None) -> None:
        self.max_images = cache_size() if max_images is None else max_images
        self._items: OrderedDict[str, dict[Hashable, SourceOutput]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str, source: Hashable) -> SourceOutput | None:
        with self._lock:
            per = self._items.get(digest)
            if per is None or source not in per:
                return None
            self._items.move_to_end(digest)
            return per[source]

    def put(self, digest: str, source: Hashable, output: SourceOutput) -> None:
        if self.max_images <= 0:
            return
        with self._lock:
            self._items.setdefault(digest, {})[source] = output
            self._items.move_to_end(digest)
            while len(self._items) > self.max_images:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
