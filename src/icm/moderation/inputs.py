"""What ``icm moderate`` reads: files, folders, glob patterns and ``-`` expanded into paths.

Folders and ``**`` patterns are walked **iteratively** (a folder 1,000 levels deep is no
RecursionError) and every folder is entered once per walk, recognised by its (device,
inode): a pattern over symbolic links that point back up (``a -> .``) ends. A folder that
cannot be read is an error entry naming it, never a silent gap and never the end of the
run.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import stat
import sys
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

from icm.moderation.image_base import MEDIA_EXTENSIONS

__all__ = ["PathEntry", "iter_image_paths", "read_path_list", "recursive_glob", "walk_files"]


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


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
    * a folder is walked (iteratively, each folder once by device and inode) in sorted
      order; files whose extension is in ``extensions`` are kept, hidden files and folders
      (``.name``) are skipped and symlinked folders are not followed (no cycles); a folder
      that cannot be read is an error entry, never a silent gap;
    * a pattern (``*``, ``?``, ``[``) that is not itself an existing path is expanded
      like :func:`glob.glob` (``**`` recurses, following symlinked folders but entering
      each folder once), matches sorted; matched folders are walked;
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

    def unreadable(raw: str, item: OSError) -> PathEntry:
        where = os.fsdecode(item.filename) if item.filename is not None else raw
        why = "permission denied" if isinstance(item, PermissionError) else _cause(item)
        return PathEntry(raw, error=f"cannot read folder {where}: {why}")

    def walk(raw: str, root: Path) -> Iterator[PathEntry]:
        for item in walk_files(root, exts):
            if isinstance(item, OSError):
                yield unreadable(raw, item)
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
            matches: list[str] = []
            found: list[PathEntry] = []
            for item in recursive_glob(raw) if "**" in raw else sorted(glob.glob(raw)):
                if isinstance(item, OSError):
                    found.append(unreadable(raw, item))
                else:
                    matches.append(item)
            for match in map(Path, matches):
                if match.is_dir():
                    found.extend(walk(raw, match))
                elif match.suffix.lower() in exts:
                    found.extend(emit(raw, match))
            if not matches and not found:
                yield PathEntry(raw, error=f"no files match the pattern {raw}")
            elif not any(e.ok for e in found):
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


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def walk_files(root: str | os.PathLike[str], exts: Collection[str]) -> Iterator[Path | OSError]:
    """Image files under ``root`` in ``os.walk`` order (a folder's files sorted, then its
    subfolders sorted, depth first), without recursion; an :class:`OSError` for each folder
    that cannot be read. Hidden names are skipped, symlinked folders are not entered, and a
    folder already walked (same device and inode: a bind mount of its parent) is not
    walked again."""
    done: set[tuple[int, int]] = set()
    stack = [os.fspath(root)]
    while stack:
        top = stack.pop()
        try:
            st = os.stat(top)
            with os.scandir(top) as it:
                entries = list(it)
        except OSError as exc:
            if exc.filename is None:
                exc.filename = top
            yield exc
            continue
        if (st.st_dev, st.st_ino) in done:
            continue
        done.add((st.st_dev, st.st_ino))
        files: list[str] = []
        dirs: list[str] = []
        for e in entries:
            if e.name.startswith("."):
                continue
            if _is_dir(e):
                if not e.is_symlink():
                    dirs.append(e.name)
            elif os.path.splitext(e.name.rstrip())[1].lower() in exts:  # "photo.png " counts as a .png
                files.append(e.name)
        for name in sorted(files):
            yield Path(top) / name
        stack.extend(os.path.join(top, d) for d in sorted(dirs, reverse=True))


def _parts(pattern: str) -> tuple[str, list[str]]:
    """(the literal folder a pattern starts from, its remaining components)."""
    anchor = os.sep if pattern.startswith(os.sep) else ""
    comps = [c for c in pattern.split(os.sep) if c]
    base: list[str] = []
    while comps and not (_GLOB_CHARS & set(comps[0])) and len(comps) > 1:
        base.append(comps.pop(0))
    return anchor + os.path.join(*base) if base else (anchor or os.curdir), [c for c in comps if c != "."]


def recursive_glob(pattern: str) -> Iterator[str | OSError]:
    """The matches of a ``**`` pattern, sorted, as :func:`glob.glob` with ``recursive=True``
    gives them (``**`` matches zero or more folders, hidden names only by a pattern that
    starts with a dot), but iterative and entering each folder once per pattern position
    (device, inode): symlinks that point back up end instead of branching forever. An
    :class:`OSError` for each folder that cannot be read comes first."""
    base, comps = _parts(pattern)
    n = len(comps)

    def closure(states: frozenset[int]) -> frozenset[int]:
        out = set(states)
        todo = list(states)
        while todo:
            i = todo.pop()
            if i < n and comps[i] == "**" and i + 1 not in out:
                out.add(i + 1)
                todo.append(i + 1)
        return frozenset(out)

    def spell(path: str) -> str:
        return path[len(os.curdir + os.sep):] if base == os.curdir and path.startswith(os.curdir + os.sep) else path

    if not os.path.isdir(base):
        return
    matches: list[str] = []
    errors: list[OSError] = []
    start = closure(frozenset({0}))
    if n in start and comps and comps[-1] == "**":
        matches.append(os.path.join(base, ""))  # 'dir/**' matches 'dir/' itself, as glob does
    visited: set[tuple[int, int, frozenset[int]]] = set()
    stack: list[tuple[str, frozenset[int]]] = [(base, start)]
    while stack:
        folder, states = stack.pop()
        try:
            st = os.stat(folder)
            key = (st.st_dev, st.st_ino, states)
            if key in visited:
                continue
            visited.add(key)
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            if exc.filename is None:
                exc.filename = folder
            errors.append(exc)
            continue
        for e in entries:
            hidden = e.name.startswith(".")
            is_dir = _is_dir(e)
            nxt: set[int] = set()
            for i in states:
                if i >= n:
                    continue
                comp = comps[i]
                if comp == "**":
                    if hidden:
                        continue
                    if i == n - 1:
                        nxt.add(n)  # a trailing ** matches files and folders
                    if is_dir:
                        nxt.add(i)
                elif (not hidden or comp.startswith(".")) and fnmatch.fnmatch(e.name, comp):
                    nxt.add(i + 1)
            if not nxt:
                continue
            reached = closure(frozenset(nxt))
            path = spell(os.path.join(folder, e.name))
            if n in reached:
                matches.append(path)
            if is_dir and any(i < n for i in reached):
                stack.append((os.path.join(folder, e.name), frozenset(i for i in reached if i < n)))
    yield from errors
    yield from sorted(set(matches))
