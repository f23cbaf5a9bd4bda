"""Fetching image URLs for ``/v1/moderations`` without becoming an SSRF proxy.

A URL is fetched only when its host is on the operator's allow-list (``--image-url-host``);
the host is resolved first and every address it resolves to must be a public one (no
loopback, private, link-local, multicast, reserved or unspecified address, IPv4-mapped
IPv6 included), and the request then goes to the address that was checked (so a DNS
answer that changes between the check and the connection cannot redirect it; TLS still
verifies the certificate for the host name). Redirects are followed by hand, each new URL
checked the same way, at most ``max_redirects`` of them; the body is read up to the
upload limit and the whole fetch has one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from icm.redact import redact_text
from icm.serve.errors import APIError

log = logging.getLogger("icm.serve")


def _unfetched(host: str, why: str) -> APIError:
    """One answer for every failure after the address checks (refused, timed out, an HTTP
    error, a reset): what differs would tell a client which ports of the host are open. The
    reason goes to the server log."""
    log.warning("image URL fetch from %r failed: %s", host, redact_text(why))
    return APIError(502, "image_fetch_failed", f"could not fetch the image from {host!r}")


@dataclass
class FetchPolicy:
    hosts: list[str]
    max_bytes: int
    timeout_s: float = 10.0
    max_redirects: int = 3
    private_networks: bool = False


def host_listed(host: str, allowed: list[str]) -> bool:
    """``host`` equals an entry, or is below a ``*.example.com`` entry (not example.com itself)."""
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry.startswith("*."):
            if host.endswith(entry[1:]) and host != entry[2:]:
                return True
        elif host == entry:
            return True
    return False


NAT64 = ipaddress.ip_network("64:ff9b::/96")


def public_address(ip: str) -> bool:
    """Whether ``ip`` is a public unicast address; an IPv6 address that carries an IPv4 one
    (IPv4-mapped, 6to4 ``2002::/16``, Teredo, NAT64) is judged by the IPv4 address it reaches,
    and site-local ``fec0::/10`` (deprecated, still routed inside some networks) is private."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.is_site_local:
            return False
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is None and addr in NAT64:
            embedded = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if embedded is not None:
            return public_address(str(embedded))
    return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_unspecified)


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})  # an address, not an AF_PACKET index


class ImageFetcher:
    """Fetches allow-listed image URLs; raises :class:`APIError` with a status a client can act on."""

    def __init__(self, policy: FetchPolicy, *, resolver: Resolver = resolve) -> None:
        self.policy = policy
        self.resolver = resolver

    def _check(self, url: str) -> tuple[str, str, int, str]:
        """(scheme, host, port, address to connect to) for an allowed URL."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise APIError(400, "image_url_refused", f"image URLs are data: URLs or http(s) URLs, not {scheme or 'no scheme'!r}")
        host = parts.hostname or ""
        if parts.username or parts.password:
            raise APIError(400, "image_url_refused", "image URLs with credentials are refused")
        if not host or not host_listed(host, self.policy.hosts):
            listed = "none is allowed on this server" if not self.policy.hosts else "it is not on the server's --image-url-host list"
            raise APIError(400, "image_url_refused", f"the server does not fetch images from {host!r}: {listed} (send a data: URL instead)")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            raise APIError(400, "image_url_refused", "the image URL has an invalid port") from None
        try:
            addresses = self.resolver(host, port)
        except OSError as exc:
            raise APIError(502, "image_fetch_failed", f"could not resolve {host!r}: {exc}") from None
        if not addresses:
            raise APIError(502, "image_fetch_failed", f"{host!r} resolves to no address")
        if not self.policy.private_networks:
            bad = [a for a in addresses if not public_address(a)]
            if bad:
                raise APIError(
                    400, "image_url_refused",
                    f"{host!r} resolves to a private or reserved address ({bad[0]}); the server fetches public addresses only",
                )
        return scheme, host, port, addresses[0]

    async def fetch(self, url: str) -> bytes:
        """The image bytes at ``url`` (one deadline for the whole fetch, redirects included)."""
        try:
            return await asyncio.wait_for(self._fetch(url), timeout=self.policy.timeout_s)
        except asyncio.TimeoutError:
            raise _unfetched(urlsplit(url).hostname or "", f"no answer within {self.policy.timeout_s:g} s") from None

    async def _fetch(self, url: str) -> bytes:
        limit = self.policy.max_bytes
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.policy.timeout_s, trust_env=False) as client:
            for _hop in range(self.policy.max_redirects + 1):
                scheme, host, port, address = await asyncio.to_thread(self._check, url)
                parts = urlsplit(url)
                ip_host = f"[{address}]" if ":" in address else address
                target = parts._replace(netloc=f"{ip_host}:{port}").geturl()
                headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*", "User-Agent": "icm-serve"}
                ext = {"sni_hostname": host} if scheme == "https" else {}
                try:
                    async with client.stream("GET", target, headers=headers, extensions=ext) as resp:
                        if resp.status_code in (301, 302, 303, 307, 308):
                            location = resp.headers.get("location")
                            if not location:
                                raise _unfetched(host, "a redirect without a Location")
                            url = urljoin(url, location)
                            continue
                        if resp.status_code != 200:
                            raise _unfetched(host, f"HTTP {resp.status_code}")
                        declared = resp.headers.get("content-length")
                        if declared and declared.isdigit() and int(declared) > limit:
                            raise APIError(413, "image_too_large", f"the image at the URL is over the {limit:,}-byte limit")
                        data = bytearray()
                        async for chunk in resp.aiter_bytes():
                            data += chunk
                            if len(data) > limit:
                                raise APIError(413, "image_too_large", f"the image at the URL is over the {limit:,}-byte limit")
                        return bytes(data)
                except httpx.HTTPError as exc:
                    raise _unfetched(host, f"{type(exc).__name__}: {exc}") from None
        raise APIError(502, "image_fetch_failed", f"the image URL redirected more than {self.policy.max_redirects} times")
