"""Race-free reading of a client-named file beneath ``--image-root``.

Checking a path (``realpath`` + ``commonpath``) and then opening it is a time-of-check to
time-of-use race: a directory swapped for a symlink between the two lets the open follow
the link out of the root. :func:`read_beneath` never opens a path string: it holds a
descriptor of the root and opens one component at a time relative to the descriptor of
the folder before it (``openat``), always with ``O_NOFOLLOW``, so nothing the kernel
resolves can be a symlink. A symlink met on the way is read with ``readlinkat`` (atomic)
and its target is walked the same way, from the root for an absolute target that lies in
the root and from the link's folder otherwise; ``..`` never climbs above the root. This is
what ``openat2(RESOLVE_BENEATH)`` does in the kernel, done in user space so that it works
on every POSIX system and yields the file's name relative to the root.

The final descriptor is checked (a regular file, not over the size limit) before a byte is
read, and opened with ``O_NONBLOCK`` so a FIFO cannot hang the open.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_SYMLINKS = 40  # as Linux's path resolution


class PathRefused(Exception):
    """A path the server will not read: ``status``/``code`` for the reply, and a message
    that names the client's path but never the file's contents."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_NOFOLLOW | _O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def supported() -> bool:
    """Whether this platform can walk paths by descriptor (``openat`` with ``O_NOFOLLOW``)."""
    return bool(_O_NOFOLLOW) and os.open in os.supports_dir_fd and os.readlink in os.supports_dir_fd


def read_beneath(root: str, path: str, max_bytes: int) -> tuple[bytes, str]:
    """The bytes of the regular file ``path`` names beneath ``root``, and its name relative to it.

    ``path`` is relative to ``root``, or absolute and inside it. Raises :class:`PathRefused`
    for a path outside the root (also through a symlink), a missing file, something that
    is not a regular file, a file over ``max_bytes``, or a file the server may not read.
    """
    if not supported():
        raise PathRefused(403, "paths_unsupported", "server-side paths need a POSIX system with openat and O_NOFOLLOW")
    if "\x00" in path or not path.strip():
        raise PathRefused(400, "bad_path", "the path is empty or contains a NUL character")
    root_fd = os.open(root, _DIR_FLAGS & ~_O_NOFOLLOW)  # the operator's root itself may be a link
    try:
        return _walk(root_fd, _root_spellings(root), path, max_bytes)
    finally:
        os.close(root_fd)


def _root_spellings(root: str) -> tuple[str, ...]:
    """Absolute spellings of the root an absolute path or link target may start with."""
    out = []
    for p in (os.path.abspath(root), os.path.realpath(root)):
        p = p.rstrip("/") or "/"
        if p not in out:
            out.append(p)
    return tuple(out)


def _relative_to_root(target: str, roots: tuple[str, ...]) -> str | None:
    """``target`` (absolute) relative to the root, or None when it is not inside it."""
    norm = os.path.normpath(target)
    for r in roots:
        if norm == r:
            return ""
        prefix = r if r.endswith("/") else r + "/"
        if norm.startswith(prefix):
            return norm[len(prefix):]
    return None


def _walk(root_fd: int, roots: tuple[str, ...], path: str, max_bytes: int) -> tuple[bytes, str]:
    outside = PathRefused(403, "path_outside_root", f"the path {path!r} is outside the server's image folder")
    if os.path.isabs(path):
        rel = _relative_to_root(path, roots)
        if rel is None:
            raise outside
        path = rel
    # ``stack`` holds (name, fd) of the folders below the root we are in; the root is implicit.
    stack: list[tuple[str, int]] = []
    todo = [c for c in path.split("/") if c not in ("", ".")]
    todo.reverse()  # a stack of components still to walk, next one last
    links = 0

    def here() -> int:
        return stack[-1][1] if stack else root_fd

    try:
        while todo:
            name = todo.pop()
            if name == "..":
                if not stack:
                    raise outside
                os.close(stack.pop()[1])
                continue
            last = not todo
            try:
                fd = os.open(name, _FILE_FLAGS if last else _DIR_FLAGS, dir_fd=here())
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise _refusal(exc, path) from None
                try:
                    target = os.readlink(name, dir_fd=here())
                except OSError:  # not a symlink: a file where a folder was expected
                    raise PathRefused(404, "no_such_file", f"no file {path!r} in the server's image folder") from None
                links += 1
                if links > MAX_SYMLINKS:
                    raise PathRefused(422, "too_many_links", f"the path {path!r} has too many levels of symbolic links") from None
                if os.path.isabs(target):
                    rel = _relative_to_root(target, roots)
                    if rel is None:
                        raise outside from None
                    while stack:
                        os.close(stack.pop()[1])
                    target = rel
                more = [c for c in target.split("/") if c not in ("", ".")]
                todo.extend(reversed(more))
                continue
            if last:
                names = [n for n, _ in stack] + [name]
                try:
                    return _read_fd(fd, "/".join(names), max_bytes), "/".join(names)
                finally:
                    os.close(fd)
            stack.append((name, fd))
        # the path ended on a folder (or the root itself)
        raise PathRefused(422, "not_a_file", f"{path!r} is not a file")
    finally:
        for _, fd in stack:
            os.close(fd)


def _read_fd(fd: int, rel: str, max_bytes: int) -> bytes:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise PathRefused(422, "not_a_file", f"{rel!r} is not a regular file")
    if st.st_size > max_bytes:
        raise PathRefused(413, "image_too_large", f"{rel!r} is over the {max_bytes:,}-byte upload limit")
    os.set_blocking(fd, True)
    chunks: list[bytes] = []
    n = 0
    while n <= max_bytes:
        chunk = os.read(fd, min(1 << 20, max_bytes + 1 - n))
        if not chunk:
            break
        chunks.append(chunk)
        n += len(chunk)
    if n > max_bytes:  # grew since the fstat
        raise PathRefused(413, "image_too_large", f"{rel!r} is over the {max_bytes:,}-byte upload limit")
    return b"".join(chunks)


def _refusal(exc: OSError, path: str) -> PathRefused:
    if exc.errno == errno.ENOENT:
        return PathRefused(404, "no_such_file", f"no file {path!r} in the server's image folder")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PathRefused(403, "permission_denied", f"the server may not read {path!r}")
    if exc.errno == errno.ENAMETOOLONG:
        return PathRefused(400, "bad_path", "the path is too long")
    return PathRefused(422, "unreadable_file", f"{path!r} could not be opened ({errno.errorcode.get(exc.errno or 0, 'error')})")
