"""Keeping credentials out of what people see: URLs with ``user:password@`` and texts holding them.

A base URL such as ``http://user:pw@host/v1`` works (the HTTP client sends the userinfo as
Basic auth), but it must not appear in a record's ``model``, in ``/healthz``, in an error
message or in a log line: :func:`redact_url` and :func:`redact_text` replace the userinfo
with ``***``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDACTED", "redact_text", "redact_url"]

REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s?#@]*(?:@[^/\s?#@]*)*)@")


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (other URLs unchanged)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if "@" not in parts.netloc:
        return redact_text(url)  # a URL inside the path or query may still hold one
    host = parts.netloc.rsplit("@", 1)[1]
    return redact_text(urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}")))


def redact_text(text: str) -> str:
    """``text`` with the userinfo of every ``scheme://user:password@`` in it replaced by ``***``."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
