"""Kept images: content-addressed files beside the decision store, and their retention."""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from icm.serve.store import DecisionStore

_SHA = re.compile(r"^[0-9a-f]{64}$")

FORMAT_MEDIA_TYPES = {
    "JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif", "WEBP": "image/webp",
    "BMP": "image/bmp", "TIFF": "image/tiff", "ICO": "image/x-icon", "PPM": "image/x-portable-anymap",
}


class ImageStore:
    """Image bytes kept on disk under their SHA-256 (``ab/abcdef...``); written atomically."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, sha256: str, data: bytes) -> Path:
        """Keep ``data``; an image kept already is touched, so its retention starts again."""
        target = self.path(sha256)
        if target.exists():
            try:
                os.utime(target)
                return target
            except FileNotFoundError:  # purged meanwhile: write it again
                pass
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return target

    def get(self, sha256: str) -> bytes | None:
        try:
            return self.path(sha256).read_bytes()
        except (FileNotFoundError, ValueError):
            return None

    def purge(self, older_than_s: float, *, now: float | None = None) -> list[str]:
        """Delete kept images (and stray temporary files) not written for ``older_than_s``
        seconds; returns the SHA-256 of each image deleted."""
        cutoff = (time.time() if now is None else now) - older_than_s
        gone: list[str] = []
        if not self.root.is_dir():
            return gone
        for sub in sorted(self.root.iterdir()):
            if not sub.is_dir() or sub.is_symlink() or len(sub.name) != 2:
                continue
            for f in sub.iterdir():
                try:
                    st = f.lstat()
                except FileNotFoundError:
                    continue
                if st.st_mtime >= cutoff or not (_SHA.match(f.name) or f.name.startswith(".tmp-")):
                    continue
                try:
                    f.unlink()
                except FileNotFoundError:
                    continue
                if _SHA.match(f.name):
                    gone.append(f.name)
        return gone


def purge_kept_images(store: DecisionStore, images: ImageStore, days: float, *, now: float | None = None) -> int:
    """Delete kept images older than ``days`` and mark their decisions as without image.

    A moderation server receives images that may be illegal to hold; keeping them only as
    long as reviewers need them is the operator's duty (``--keep-images-days``). Returns how
    many images were deleted; ``days`` 0 deletes nothing.
    """
    if days <= 0:
        return 0
    gone = images.purge(days * 86400.0, now=now)
    store.mark_images_gone(gone)
    return len(gone)
