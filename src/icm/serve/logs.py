"""The server's logs: the request id of each request, and the text or JSON line format (issue 21).

:data:`request_id` holds the id of the request being served (the :class:`~icm.serve.middleware.RequestContext`
middleware sets it), so every record logged while serving it carries it. ``icm serve --log-format json``
writes one JSON object per line (:class:`JsonFormatter`): ``time``, ``level``, ``logger``, ``message``,
``request_id``, and on the access line of each request ``method``, ``route``, ``status``,
``latency_ms``, ``key`` (the API key's name) and ``decision_ids``. Python warnings (torch's,
transformers') go through logging too (``logging.captureWarnings``), as ``py.warnings`` records.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import TextIO

request_id: ContextVar[str | None] = ContextVar("icm_request_id", default=None)

MAX_REQUEST_ID = 128
ACCESS_FIELDS = ("method", "route", "status", "latency_ms", "key", "decision_ids")


def clean_request_id(value: str | None) -> str:
    """The client's ``X-Request-ID`` when it is 1 to 128 printable ASCII characters; a new id otherwise."""
    if value and len(value) <= MAX_REQUEST_ID and all(" " <= ch <= "~" for ch in value) and value.strip():
        return value
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Put the current request's id on every record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None) or request_id.get(),
        }
        for name in ACCESS_FIELDS:
            if hasattr(record, name):
                out[name] = getattr(record, name)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(levelname)-9s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request {rid}]" if rid else line


class _ServerHandler(logging.StreamHandler):
    """The handler :func:`configure_logging` installs (a second call replaces it)."""


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """One handler on the root logger in ``fmt`` (text or json); warnings go through logging.

    Returns the handler (tests read what it writes)."""
    handler = _ServerHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ServerHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    name = level.upper()
    logging.getLogger("icm").setLevel(name if isinstance(logging.getLevelName(name), int) else "INFO")  # 3.10: no getLevelNamesMapping
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    return handler
