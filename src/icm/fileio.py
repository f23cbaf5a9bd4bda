"""The project's two file primitives: reading JSONL and replacing a file atomically.

* :func:`read_jsonl`: one JSON object per line (blank lines skipped), optionally
  validated into a pydantic model. A bad line is a :class:`JSONLError` whose message
  starts ``FILE:LINE:``; by default the first one is raised, with ``skip_bad=True`` every
  good line is kept and the bad ones are listed (a run killed mid-write leaves a torn
  last line, which must not hide the rest of the file). Lines are decoded one by one, so
  a torn multi-byte character spoils its own line only.
* :func:`atomic_write`: a file is written to a temporary file beside it, flushed to disk
  and renamed over the target, so a reader (or a crash) sees the old file or the new
  one, never half of one.

A library would add nothing here: ``jsonlines`` reports no line numbers and validates
no models, and ``atomicwrites`` is unmaintained (archived in 2022).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar, overload

from pydantic import BaseModel, ValidationError

__all__ = ["JSONLError", "JSONLRows", "atomic_write", "read_jsonl", "read_text"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


class JSONLError(ValueError):
    """One unreadable line of a JSONL file: ``str()`` is ``FILE:LINE: reason``."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class JSONLRows(list, Generic[T]):
    """The values read, in file order, with ``lines`` (the line number of each) and
    ``errors`` (the lines skipped, only with ``skip_bad=True``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []
        self.errors: list[JSONLError] = []


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors()[0] if exc.errors() else None
        if err is not None:
            where = ".".join(str(x) for x in err.get("loc", ())) or "the record"
            more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
            return f"{where}: {err.get('msg', 'invalid')}{more}"
    if isinstance(exc, json.JSONDecodeError):
        return f"not a JSON object ({exc.msg} at column {exc.colno})"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def read_text(path: str | os.PathLike[str], what: str = "", *, encoding: str = "utf-8") -> str:
    """The text of a file; ``ValueError("cannot read [WHAT ]FILE: reason")`` when there is none.

    ``encoding="utf-8-sig"`` drops a byte-order mark.
    """
    where = f"{what} {os.fspath(path)}" if what else os.fspath(path)
    try:
        return Path(path).read_text(encoding=encoding)
    except OSError as exc:
        raise ValueError(f"cannot read {where}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read {where}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


@overload
def read_jsonl(path: str | os.PathLike[str], model: type[M], *, skip_bad: bool = ..., missing_ok: bool = ...,
               text: str | None = ...) -> JSONLRows[M]: ...
@overload
def read_jsonl(path: str | os.PathLike[str], model: None = ..., *, skip_bad: bool = ..., missing_ok: bool = ...,
               text: str | None = ...) -> JSONLRows[dict[str, Any]]: ...
def read_jsonl(
    path: str | os.PathLike[str],
    model: type[BaseModel] | None = None,
    *,
    skip_bad: bool = False,
    missing_ok: bool = False,
    text: str | None = None,
) -> JSONLRows[Any]:
    """The JSON objects of a JSONL file, validated into ``model`` when given.

    ``skip_bad``: keep going past bad lines and list them in ``.errors`` (otherwise the
    first one is raised as :class:`JSONLError`). ``missing_ok``: a missing file reads as
    empty (otherwise ``ValueError("cannot read FILE: ...")``). ``text``: parse this text
    instead of reading ``path`` (which then only names the source in errors). A UTF-8
    byte-order mark at the start is ignored.
    """
    name = os.fspath(path)
    out: JSONLRows[Any] = JSONLRows()
    if text is not None:
        lines: Any = text.splitlines()
    else:
        try:
            fh = open(path, "rb")
        except FileNotFoundError as exc:
            if missing_ok:
                return out
            raise ValueError(f"cannot read {name}: {exc.strerror or exc}") from None
        except OSError as exc:
            raise ValueError(f"cannot read {name}: {exc.strerror or exc}") from None
        lines = fh
    try:
        for no, raw in enumerate(lines, 1):
            try:
                line = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).rstrip("\r\n")
                if no == 1:
                    line = line.removeprefix("\ufeff")
                if not line.strip():
                    continue
                if model is not None:
                    value: Any = model.model_validate_json(line)
                else:
                    value = json.loads(line)
                    if not isinstance(value, dict):
                        raise ValueError(f"not a JSON object (a JSON {type(value).__name__})")
            except (ValueError, UnicodeDecodeError) as exc:  # ValidationError and JSONDecodeError are ValueErrors
                err = JSONLError(name, no, "not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else _reason(exc))
                if not skip_bad:
                    raise err from None
                out.errors.append(err)
                continue
            out.append(value)
            out.lines.append(no)
    finally:
        if text is None:
            lines.close()
    return out


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: Literal["w", "wb"] = "w", *, encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """Write ``path`` all or nothing: ``with atomic_write(p) as fh: fh.write(...)``.

    The data goes to a uniquely named temporary file in the same folder (``.NAME.*.tmp``),
    which is flushed, fsynced and renamed over ``path`` when the block ends; if the block
    raises, the temporary file is removed and ``path`` is untouched. The parent folder is
    created if needed.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(p.parent / f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # 0o666: the umask applies, as with open()
    try:
        with open(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if os.name == "posix":  # make the rename itself durable
        with contextlib.suppress(OSError):
            dfd = os.open(p.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
