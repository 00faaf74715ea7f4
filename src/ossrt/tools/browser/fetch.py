"""SSRF-safe HTTP(S) fetching for the browser.

Policy (every hop of a redirect chain is checked the same way):
- only http and https; no credentials in the URL;
- the host is resolved here and every address it resolves to must be globally routable:
  loopback, link-local (169.254.0.0/16 incl. cloud metadata, fe80::/10), private (RFC 1918,
  fc00::/7), shared (100.64.0.0/10), unspecified, multicast, reserved and documentation
  ranges are refused, unless `allow_private=True` or the host (or host:port) is in
  `allow_hosts`;
- the connection goes to the address that was checked (the URL is rewritten to the IP,
  with the Host header and TLS SNI/certificate check kept on the name), so a DNS answer that
  changes between check and connect (rebinding) cannot redirect it;
- redirects are followed by hand, at most `max_redirects`; the body is capped at
  `max_bytes` (the rest is dropped, `truncated` says so) and the whole fetch at `timeout_s`;
  environment proxies are ignored.
A refusal raises `FetchError` with a message meant for the model; no request is sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from .backend import BackendError

_REDIRECTS = {301, 302, 303, 307, 308}
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class FetchError(BackendError):
    """The fetch was refused or failed; str(exc) is the reason shown to the model."""


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """Limits of `SafeFetcher` (see the module doc for the policy)."""

    max_bytes: int = 2_000_000
    timeout_s: float = 10.0
    max_redirects: int = 5
    allow_private: bool = False
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    user_agent: str = "ossrt-browser/0.1 (+https://github.com/openai/gpt-oss)"


@dataclass(frozen=True, slots=True)
class FetchResponse:
    url: str
    status: int
    content_type: str
    body: bytes
    truncated: bool
    encoding: str | None = None

    def text(self) -> str:
        try:
            return self.body.decode(self.encoding or "utf-8", "replace")
        except LookupError:  # an unknown charset name
            return self.body.decode("utf-8", "replace")


def address_allowed(ip: IPAddress) -> bool:
    """True for globally routable unicast addresses only."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback
                                 or ip.is_link_local or ip.is_private or ip.is_unspecified)


class SafeFetcher:
    """GETs public web pages under the SSRF policy above."""

    def __init__(self, config: FetchConfig | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config or FetchConfig()
        self._client = httpx.AsyncClient(trust_env=False, follow_redirects=False,
                                         transport=transport,
                                         timeout=httpx.Timeout(self.config.timeout_s))

    async def aclose(self) -> None:
        await self._client.aclose()

    async def check(self, url: str) -> tuple[str, IPAddress, str, int]:
        """Validate `url`; returns (scheme, address to connect to, host, port). Raises FetchError."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise FetchError(f"invalid URL {url!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError(f"refused {url!r}: only http and https URLs can be opened"
                             + (f" (not {scheme}:)" if scheme else ""))
        if parts.username or parts.password:
            raise FetchError(f"refused {url!r}: URLs with credentials are not allowed")
        host = (parts.hostname or "").lower()
        if not host:
            raise FetchError(f"invalid URL {url!r}: no host")
        port = port or (443 if scheme == "https" else 80)
        allowed = (self.config.allow_private or host in self.config.allow_hosts
                   or f"{host}:{port}" in self.config.allow_hosts)
        try:
            addrs: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise FetchError(f"could not resolve {host!r}: {exc}") from None
            addrs = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addrs:
            raise FetchError(f"could not resolve {host!r}")
        if not allowed:
            bad = [a for a in addrs if not address_allowed(a)]
            if bad:
                raise FetchError(f"refused {url!r}: {host} resolves to a non-public address "
                                 f"({bad[0]}); only public internet addresses can be opened")
        return scheme, addrs[0], host, port

    async def get(self, url: str) -> FetchResponse:
        """GET `url` following at most max_redirects checked redirects. Raises FetchError."""
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await self._get(url)
        except TimeoutError:
            raise FetchError(f"timed out after {self.config.timeout_s:g}s fetching {url}") from None
        except httpx.HTTPError as exc:
            raise FetchError(f"error fetching {url}: {type(exc).__name__}: {exc}") from None

    async def _get(self, url: str) -> FetchResponse:
        for _hop in range(self.config.max_redirects + 1):
            scheme, ip, host, port = await self.check(url)
            parts = urlsplit(url)
            ip_host = f"[{ip}]" if ip.version == 6 else str(ip)
            target = urlunsplit((scheme, f"{ip_host}:{port}", parts.path or "/", parts.query, ""))
            default_port = port == (443 if scheme == "https" else 80)
            headers = {"Host": host if default_port else f"{host}:{port}",
                       "User-Agent": self.config.user_agent,
                       "Accept": "text/html,text/plain,text/markdown,application/xhtml+xml;q=0.9,"
                                 "*/*;q=0.1"}
            extensions = {"sni_hostname": host} if scheme == "https" else {}
            req = self._client.build_request("GET", target, headers=headers,
                                             extensions=extensions)
            resp = await self._client.send(req, stream=True)
            try:
                if resp.status_code in _REDIRECTS and "location" in resp.headers:
                    url = urljoin(url, resp.headers["location"])
                    continue
                body = bytearray()
                truncated = False
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > self.config.max_bytes:
                        del body[self.config.max_bytes:]
                        truncated = True
                        break
                return FetchResponse(url=url, status=resp.status_code,
                                     content_type=resp.headers.get("content-type", ""),
                                     body=bytes(body), truncated=truncated,
                                     encoding=resp.charset_encoding)
            finally:
                await resp.aclose()
        raise FetchError(f"too many redirects (more than {self.config.max_redirects}) from {url}")
