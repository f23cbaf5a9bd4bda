"""API keys: ``Authorization: Bearer KEY``; without keys, loopback clients only.

Each key has a role (:data:`icm.serve.config.ROLES`), and each role a set of permissions
(:data:`PERMISSIONS`): the routes ask for one with :meth:`Caller.require`.

Wrong keys are throttled per client address (:class:`AuthThrottle`); the address is the
connection's peer, or the one ``X-Forwarded-For`` names when the peer is a trusted proxy
(:func:`client_address`).
"""

from __future__ import annotations

import collections
import ipaddress
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from icm.serve.config import APIKey, Role, is_loopback
from icm.serve.errors import APIError

Permission = Literal["moderate", "review", "read_all", "metrics"]

PERMISSIONS: dict[Role, frozenset[Permission]] = {
    "client": frozenset({"moderate"}),  # and its own decisions and images (scoped, not a permission)
    "reviewer": frozenset({"review", "read_all"}),
    "admin": frozenset({"moderate", "review", "read_all", "metrics"}),
}
"""What each role may do: ``moderate`` (POST /v1/moderate, /v1/moderations), ``review`` (the
queue, claims, reviews, agreement figures), ``read_all`` (every decision and kept image, not only
the key's own), ``metrics`` (GET /metrics)."""

WHAT = {
    "moderate": "moderate images", "review": "work the review queue (claims and reviews)",
    "read_all": "read other keys' decisions", "metrics": "read the metrics",
}


@dataclass(frozen=True)
class Caller:
    """Who sends a request: the key's name and role; without keys, an unnamed admin (the
    server trusts its callers then, see :class:`Authenticator`)."""

    name: str | None
    role: Role = "admin"

    def can(self, permission: Permission) -> bool:
        return permission in PERMISSIONS[self.role]

    def require(self, permission: Permission) -> None:
        """A 403 ``forbidden`` naming the key and its role when the role lacks ``permission``."""
        if not self.can(permission):
            raise APIError(
                403, "forbidden",
                f"the API key {self.name!r} has the role {self.role!r}, which may not {WHAT[permission]} "
                "(roles: docs/security.md)",
            )

    @property
    def scope(self) -> str | None:
        """The client name whose decisions and images this caller may read; None: all of them."""
        return None if self.can("read_all") else (self.name or "")


class Authenticator:
    """Checks a request's bearer token against the configured keys.

    With keys configured every ``/v1`` request needs one (401 otherwise). With none, the
    server trusts its callers, so it answers loopback clients only (403 for others) unless
    ``allow_unauthenticated`` says the operator put it behind something that authenticates.
    """

    def __init__(self, keys: Sequence[APIKey], *, allow_unauthenticated: bool = False) -> None:
        self.keys = list(keys)
        self.allow_unauthenticated = allow_unauthenticated

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    @property
    def keys_without_role(self) -> list[str]:
        """The names of keys configured without a role (full access, as admin)."""
        return sorted({k.name for k in self.keys if k.role is None})

    def principal(self, authorization: str | None, client_host: str | None) -> Caller:
        """The caller of a valid key; without keys an unnamed admin; raises APIError otherwise."""
        if not self.keys:
            if self.allow_unauthenticated or (client_host is not None and is_loopback(client_host)):
                return Caller(name=None)
            raise APIError(
                403,
                "loopback_only",
                "no API keys are configured, so this server answers only clients on this machine "
                "(configure ICM_API_KEYS, or start it with --allow-unauthenticated behind your own auth)",
            )
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(
                401, "missing_api_key", "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                headers={"WWW-Authenticate": "Bearer"},
            )
        found: APIKey | None = None
        for key in self.keys:  # compare with every key (constant time each), no early exit
            if key.matches(token) and found is None:
                found = key
        if found is None:
            raise APIError(401, "invalid_api_key", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        return Caller(name=found.name, role=found.effective_role)


LOCAL_HOSTNAMES = ("localhost", "127.0.0.1", "::1", "localhost.localdomain")


def split_host(value: str) -> str:
    """The host name of a ``Host`` header or an origin's authority, lower case, without port."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1:].split("]", 1)[0]
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def host_allowed(host_header: str | None, allowed: Sequence[str]) -> bool:
    """Whether a request's ``Host`` names this machine (or a name the operator allowed).

    A browser tricked by DNS rebinding sends the attacker's name as Host while connecting
    to 127.0.0.1, so a loopback server must refuse Host names it does not know.
    """
    if not host_header:
        return False
    host = split_host(host_header)
    names = {split_host(a) for a in allowed if a and a != "*"}
    if "*" in allowed or host in names or host in LOCAL_HOSTNAMES or host.endswith(".localhost"):
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cross_site(headers: Mapping[str, str]) -> str | None:
    """Why a request comes from another site's page, or None when it does not.

    As Go's ``http.CrossOriginProtection``: ``Sec-Fetch-Site`` (sent by every current
    browser) must be ``same-origin`` or ``none``; without it, an ``Origin`` header must name
    the same host and port as ``Host``. Requests without either come from no browser.
    """
    site = headers.get("sec-fetch-site")
    if site is not None:
        return None if site.strip().lower() in ("same-origin", "none") else f"Sec-Fetch-Site: {site}"
    origin = headers.get("origin")
    if origin is None:
        return None
    if origin.strip().lower() == "null":
        return "Origin: null"
    _, sep, authority = origin.partition("://")
    host = headers.get("host") or ""
    if not sep or authority.strip().lower().rstrip("/") != host.strip().lower():
        return f"Origin: {origin[:100]}"
    return None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _in(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    return any(ip.version == n.version and ip in n for n in networks)


def client_address(peer: str | None, forwarded_for: str | None, trusted: Sequence[Network]) -> str:
    """The client's address: the connection's ``peer``, unless the peer is a trusted proxy and
    ``X-Forwarded-For`` is set; then the right-most address in it that is not itself a trusted
    proxy (the left part of the header is whatever the client wrote, so it is never believed
    beyond the first untrusted hop)."""
    addr = peer or "unknown"
    if not forwarded_for or not _in(addr, trusted):
        return addr
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        try:
            ipaddress.ip_address(hop.strip("[]"))
        except ValueError:
            return addr  # a malformed hop: stop at the last address a trusted proxy vouched for
        addr = hop.strip("[]")
        if not _in(addr, trusted):
            return addr
    return addr


class AuthThrottle:
    """At most ``limit`` failed authentications per minute per client address; beyond that the
    address gets 429 for every request until its minute ends, before its key is even checked
    (so guessing keys runs at ``limit`` guesses a minute). Memory is bounded: past
    ``max_clients`` addresses the oldest windows are dropped. Thread-safe."""

    WINDOW = 60.0

    def __init__(self, limit: int, *, clock: Callable[[], float] = time.monotonic, max_clients: int = 100_000) -> None:
        self.limit = limit
        self.clock = clock
        self.max_clients = max_clients
        self._failures: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def _window(self, address: str, now: float) -> tuple[float, int]:
        start, count = self._failures.get(address, (now, 0))
        return (now, 0) if now - start >= self.WINDOW else (start, count)

    def check(self, address: str) -> None:
        """Raise a 429 :class:`APIError` when ``address`` used up its failures this minute."""
        now = self.clock()
        with self._lock:
            start, count = self._window(address, now)
        if count >= self.limit:
            wait = max(1, math.ceil(start + self.WINDOW - now))
            raise APIError(
                429, "too_many_failed_authentications",
                f"{count} requests from this address had a wrong API key within a minute; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )

    def failed(self, address: str) -> None:
        """Count one failed authentication of ``address``."""
        now = self.clock()
        with self._lock:
            start, count = self._window(address, now)
            self._failures[address] = (start, count + 1)
            self._failures.move_to_end(address)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
