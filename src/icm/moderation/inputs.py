"""Input expansion for a moderation batch: files, folders, glob patterns and ``-`` (a list on stdin).

Split from :mod:`icm.moderation.images`, which re-exports these names.
"""

from __future__ import annotations

import glob
import os
import stat
import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from icm.moderation.images import MEDIA_EXTENSIONS, _cause


@dataclass(frozen=True)
class PathEntry:
    """One item of a batch: an image path to load, or an input that produced none."""

    source: str
    """The command-line input this entry came from (a path, folder, pattern or ``-``)."""
    path: Path | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


_GLOB_CHARS = frozenset("*?[")


def iter_image_paths(
    inputs: Iterable[str | os.PathLike[str]],
    *,
    stdin: TextIO | BinaryIO | None = None,
    extensions: Collection[str] = MEDIA_EXTENSIONS,
    null: bool = False,
) -> Iterator[PathEntry]:
    """Expand files, folders, glob patterns and ``-`` into a deterministic list of images.

    * a file is taken as given, whatever its extension (the loader reports non-images,
      and refuses FIFOs, devices and sockets without opening them);
    * a folder is walked recursively in sorted order; files whose extension is in
      ``extensions`` are kept, hidden files and folders (``.name``) are skipped and
      symlinked folders are not followed (no cycles); a folder that cannot be read is
      an error entry, never a silent gap;
    * a pattern (``*``, ``?``, ``[``) that is not itself an existing path is expanded
      with :func:`glob.glob` (``**`` recurses), matches sorted; matched folders are walked;
    * ``-`` reads paths from ``stdin`` (default ``sys.stdin``), one per line, or separated
      by NUL bytes with ``null=True`` (``find -print0``), each treated like a
      command-line input. Names are read as bytes and decoded like ``sys.argv``
      (:func:`os.fsdecode`, so names that are not UTF-8 survive); only the line end is
      removed, so leading and trailing spaces are kept (a name containing a newline
      needs ``null``).

    Inputs that yield nothing (missing paths, patterns with no match, folders without
    images) come out as entries with ``error`` set, so the batch goes on. A file reached
    twice (by path and through its folder) is yielded once.
    """
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    seen: set[str] = set()

    def emit(source: str, path: Path) -> Iterator[PathEntry]:
        key = os.path.normcase(os.path.realpath(path))
        if key not in seen:
            seen.add(key)
            yield PathEntry(source=source, path=path)

    def walk(raw: str, root: Path) -> Iterator[PathEntry]:
        for item in _walk(root, exts):
            if isinstance(item, OSError):
                where = os.fsdecode(item.filename) if item.filename is not None else raw
                why = "permission denied" if isinstance(item, PermissionError) else _cause(item)
                yield PathEntry(raw, error=f"cannot read folder {where}: {why}")
            else:
                yield from emit(raw, item)

    def expand(raw: str) -> Iterator[PathEntry]:
        path = Path(raw)
        try:
            st: os.stat_result | None = os.stat(path)
        except PermissionError:
            yield PathEntry(raw, error=f"cannot access {raw}: permission denied")
            return
        except (OSError, ValueError):  # missing, a dangling link, a name with NUL
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            entries = list(walk(raw, path))
            yield from entries
            if not entries:
                yield PathEntry(raw, error=f"no image files in folder {raw} (looked for {', '.join(sorted(exts))})")
        elif st is not None:
            yield from emit(raw, path)  # a FIFO or device too: the loader refuses it by name
        elif _GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            found: list[PathEntry] = []
            for match in map(Path, matches):
                if match.is_dir():
                    found.extend(walk(raw, match))
                elif match.suffix.lower() in exts:
                    found.extend(emit(raw, match))
            if not matches:
                yield PathEntry(raw, error=f"no files match the pattern {raw}")
            elif not found:
                yield PathEntry(raw, error=f"the pattern {raw} matches no image files")
            yield from found
        elif path.is_symlink():
            yield PathEntry(raw, error=f"{raw} is a broken symbolic link")
        else:
            yield PathEntry(raw, error=f"no such file or folder: {raw}")

    for item in inputs:
        raw = os.fspath(item)
        if raw == "-":
            stream = stdin if stdin is not None else sys.stdin
            for name in read_path_list(stream, null=null):
                yield from expand(name)
        else:
            yield from expand(raw)


def read_path_list(stream: TextIO | BinaryIO, *, null: bool = False) -> Iterator[str]:
    """Paths from a list: one per line (only the line end is removed) or NUL-separated.

    A text stream's underlying bytes are read when it has them (``sys.stdin.buffer``) and
    decoded with :func:`os.fsdecode`, so a name that is not valid UTF-8 comes out as the
    same ``str`` the OS gives for it. Empty entries are skipped.
    """
    source: Any = getattr(stream, "buffer", stream)
    if null:
        data = source.read()
        parts: Iterable[str | bytes] = data.split(b"\0" if isinstance(data, bytes) else "\0")
    else:
        parts = source
    for part in parts:
        name = os.fsdecode(part) if isinstance(part, bytes) else part
        if not null:
            name = name[:-1] if name.endswith("\n") else name
            name = name[:-1] if name.endswith("\r") else name
        if name:
            yield name


def _walk(root: Path, exts: set[str]) -> Iterator[Path | OSError]:
    """Image files under ``root``, sorted; an :class:`OSError` for each folder that cannot be read."""
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
        yield from errors
        errors.clear()
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and os.path.splitext(name.rstrip())[1].lower() in exts:
                yield Path(dirpath) / name  # "photo.png " (trailing space) counts as a .png
    yield from errors
