"""An HTTP GET that cannot be turned against the mesh's own network (SSRF-safe fetch).

An agent chooses the URL, and the text it reads may have been written by an attacker, so "fetch
this page" must not become "read the cloud metadata service" or "poke the admin port on
localhost". Checking the host name is not enough:

- A name can resolve to a private address, or resolve to a public one when checked and a
  private one when connected (DNS rebinding). So the host is resolved exactly once per hop,
  every address is checked, and the connection goes to a checked address; no library gets a
  chance to resolve the name a second time.
- An IP can be written in many ways (``2130706433``, ``0x7f.1``, ``017700000001``, ``[::ffff:
  127.0.0.1]``); they are normalised the way the C resolver would read them and checked as IPs.
- A public page can redirect to a private one, so redirects are followed here, one hop at a
  time, each hop checked like the first.

Pinning keeps TLS honest: the request goes to ``https://<ip>/...`` with the original ``Host``
header and ``sni_hostname`` set to the host name, and httpcore verifies the certificate against
that name (not the IP). A fresh connection pool per hop means a TLS connection opened for one
name is never reused for another name that happens to share its IP.

Non-public means anything ``ipaddress`` does not call global, plus multicast, reserved and
unspecified addresses, and IPv6 forms that carry an IPv4 address (IPv4-mapped, 6to4, Teredo,
NAT64), which are judged by the IPv4 address inside them. Operators open holes with
``MESH_HTTP_ALLOW`` (host names and CIDRs).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import ipaddress
import re
import socket
import ssl
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple

import httpx

from mesh_tool_executor.errors import ToolExecutorError

ALLOW_ENV = "MESH_HTTP_ALLOW"
"""The variable the allow-list comes from (``ToolExecutorSettings.http_allow``), named in errors."""

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Resolver = Callable[[str, int], Awaitable[list[str]]]
"""(host, port) -> IP address strings. The default asks the system resolver (loop.getaddrinfo)."""

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "AgentMesh-tool-executor/1.0"

# Host names after IDNA encoding: letters, digits, hyphen, underscore (seen in real DNS), dots.
_HOSTNAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")
# Labels that all start with a digit and hold only digits, hex digits and 'x' are an attempt at a
# numeric IPv4 address: if inet_aton cannot read it either, it is refused rather than handed to DNS.
_NUMERIC_HOST = re.compile(r"^[0-9][0-9a-fx]*(\.[0-9][0-9a-fx]*)*\.?$")
# A last label that is a number makes a host an IPv4 attempt too (WHATWG URL rules).
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$")

_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")
_METADATA = ipaddress.IPv4Address("169.254.169.254")

_TEXT_TYPES = frozenset(
    {
        "application/json",
        "application/xml",
        "application/javascript",
        "application/ecmascript",
        "application/x-javascript",
        "application/x-www-form-urlencoded",
        "application/yaml",
        "application/x-yaml",
        "application/toml",
        "application/x-ndjson",
        "application/csv",
        "image/svg+xml",
    }
)


class NetError(ToolExecutorError):
    """A refused or failed fetch. The message is one line, written for the agent to read."""


@dataclass(frozen=True)
class AllowList:
    """Destinations allowed even though they are not public: exact host names and networks."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> AllowList:
        """``"127.0.0.1/32,localhost,intranet.acme.test"``: comma-separated host names and CIDRs.

        A bare IP means that one address. Wildcards are not supported: an allow-list entry is a
        decision about one destination, and ``*.corp`` would quietly cover names nobody vetted.
        """
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in spec.split(","):
            entry = raw.strip()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=True))
                continue
            except ValueError as exc:
                if "/" in entry or _NUMERIC_HOST.match(entry.lower()):
                    raise ValueError(f"{ALLOW_ENV}: {entry!r} is not a valid IP network ({exc})") from None
            host = _normalise_name(entry)
            if host is None:
                raise ValueError(
                    f"{ALLOW_ENV}: {entry!r} is neither a host name nor an IP/CIDR (wildcards are not supported)"
                )
            hosts.add(host)
        return cls(frozenset(hosts), tuple(networks))

    def permits(self, host: str, ip: IPAddress) -> bool:
        """True when the host name or the address is allow-listed.

        An IPv4-mapped IPv6 address is the same destination as its IPv4 address, so it is
        permitted by the IPv4 networks too (the other IPv6 forms with an IPv4 address inside go
        through a relay, a different destination, and are not).
        """
        if _normalise_name(host) in self.hosts:
            return True
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
        return any(a in net for a in candidates for net in self.networks)


@dataclass(frozen=True)
class FetchResult:
    url: str
    final_url: str  # after redirects, with the host name (not the pinned IP)
    status: int
    content_type: str
    text: str
    truncated: bool
    address: str  # the IP actually connected to for the final hop


def _normalise_name(host: str) -> str | None:
    """Lower-case IDNA (ASCII) form without a trailing dot, or None when it is not a host name."""
    name = host.strip().lower().rstrip(".")
    if not name:
        return None
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name if _HOSTNAME.match(name) else None


def _non_public(ip: IPAddress) -> str | None:
    """What makes the address a non-public destination ("a loopback address", ...), or None."""
    if isinstance(ip, ipaddress.IPv6Address):
        # Python calls 6to4, Teredo and NAT64 addresses global even when the IPv4 address they
        # carry is 127.0.0.1; judge them by what is inside.
        embedded: ipaddress.IPv4Address | None = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip.teredo is not None:
            embedded = ip.teredo[1]
        if embedded is None and any(ip in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and (inner := _non_public(embedded)) is not None:
            return f"an IPv6 form of {embedded}, {inner}"
    checks: tuple[tuple[bool, str], ...] = (
        (ip.is_unspecified, "the unspecified address"),
        (ip.is_loopback, "a loopback address"),
        (ip == _METADATA, "the cloud metadata address (link-local)"),
        (ip.is_link_local, "a link-local address"),
        (ip.is_multicast, "a multicast address"),  # is_global is True for most of 224.0.0.0/4
        (isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED, "a shared (carrier-grade NAT) address"),
        (ip.is_private, "a private address"),
        (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local, "a site-local address"),
        (ip.is_reserved, "a reserved address"),
        (not ip.is_global, "not a public address"),
    )
    return next((phrase for hit, phrase in checks if hit), None)


def _parse_ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def check_address(host: str, ip: str, allow: AllowList) -> None:
    """Raise NetError unless ``ip`` (what ``host`` resolved to) is public or allow-listed."""
    address = _parse_ip(ip)
    if address is None:
        raise NetError(f"refused: {host} resolved to {ip!r}, which is not an IP address")
    if allow.permits(host, address):
        return
    reason = _non_public(address)
    if reason is None:
        return
    if _parse_ip(host) == address:
        origin = ""
    elif _spelled_ipv4(host) == address:
        origin = f" (written as {host})"
    else:
        origin = f" ({host} resolves to it)"
    raise NetError(f"refused: {address} is {reason}{origin}; allow-list it with {ALLOW_ENV}")


@dataclass(frozen=True)
class _Target:
    url: httpx.URL  # as requested, with the host name
    host: str  # ASCII, lower-case, no trailing dot (IPv6 without brackets)
    port: int
    literal: IPAddress | None  # the host was an IP, in any spelling


def _spelled_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a numeric host spells the way inet_aton (and so getaddrinfo) reads it.

    ``2130706433``, ``0x7f.1``, ``017700000001`` and ``127.1`` are all 127.0.0.1 to the C
    resolver; ``ipaddress`` alone only reads the dotted-quad form.
    """
    if not _NUMERIC_HOST.match(host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
    except OSError:
        return None


def _literal_ip(host: str) -> IPAddress | None:
    """The IP a URL host spells, in any spelling; NetError for a malformed numeric host."""
    address = _parse_ip(host) or _spelled_ipv4(host)
    if address is not None:
        return address
    # Numeric but unreadable (1.2.3.4.5, 0x1g, foo.123): refused rather than handed to DNS,
    # where each resolver may read it its own way.
    if _NUMERIC_HOST.match(host) or _NUMERIC_LABEL.match(host.rstrip(".").rsplit(".", 1)[-1]):
        raise NetError(f"refused: {host} looks like a malformed IP address")
    return None


def _target(url: str) -> _Target:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise NetError(f"invalid URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise NetError(f"refused: scheme {parsed.scheme or '(none)'!r} is not allowed (http and https only)")
    if parsed.userinfo:
        raise NetError("refused: credentials in the URL (user:password@host) are not allowed")
    raw_host = parsed.raw_host.decode("ascii").lower()
    if not raw_host:
        raise NetError(f"invalid URL {url!r}: no host")
    literal = _literal_ip(raw_host)
    if literal is not None:
        host = raw_host
    else:
        name = _normalise_name(raw_host)
        if name is None:
            raise NetError(f"invalid URL {url!r}: bad host name {raw_host!r}")
        host = name
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return _Target(parsed.copy_with(fragment=None), host, port, literal)


async def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for (host, port), in its order, without repeats."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise NetError(f"could not resolve {host}: {exc.strerror}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def _addresses(target: _Target, allow: AllowList, resolver: Resolver) -> list[str]:
    """Resolve once and check every address: one bad address refuses the host (rebinding sets
    often mix a public and a private answer, hoping the client connects to the second)."""
    if target.literal is not None:
        check_address(target.host, str(target.literal), allow)
        return [str(target.literal)]
    ips = await resolver(target.host, target.port)
    if not ips:
        raise NetError(f"could not resolve {target.host}: no addresses")
    for ip in ips:
        check_address(target.host, ip, allow)
    return [str(ipaddress.ip_address(ip)) for ip in ips]


class _Borrowed(httpx.AsyncBaseTransport):
    """A caller's transport, used without taking ownership: closing the client leaves it open."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self._inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._inner.handle_async_request(request)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        return None

    async def aclose(self) -> None:
        return None


@functools.cache
def _tls() -> ssl.SSLContext:
    # Built once: loading the CA bundle costs ~0.1 s, too much to pay for every hop. A context
    # holds settings and CAs, not connections, so sharing it shares nothing between requests.
    # SSL_CERT_FILE / SSL_CERT_DIR are honoured: a private CA for an allow-listed intranet host.
    return httpx.create_ssl_context()


def _client(transport: httpx.AsyncBaseTransport | None, timeout_s: float) -> httpx.AsyncClient:
    # trust_env=False: HTTP(S)_PROXY from the environment would send the request to a proxy that
    # does its own DNS, undoing the pinning (and the proxy itself may sit on a private network).
    return httpx.AsyncClient(
        transport=_Borrowed(transport) if transport is not None else httpx.AsyncHTTPTransport(verify=_tls(), retries=0),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(timeout_s),
    )


def _is_text(mime: str) -> bool:
    return mime.startswith("text/") or mime in _TEXT_TYPES or mime.endswith(("+json", "+xml"))


async def _read_capped(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    """Read at most max_bytes of the decoded body (plus one network chunk); True when cut short.

    The raw stream is decoded here rather than by httpx, because httpx inflates a whole chunk
    at once: a small gzip bomb would become a large buffer before any size check. We ask for
    ``identity``; gzip/deflate from a server that ignores that are inflated with a bound.
    """
    if response.is_stream_consumed:
        # Some transports (httpx.MockTransport) hand over a body already in memory, decoded.
        return response.content[:max_bytes], len(response.content) > max_bytes
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    inflater: zlib._Decompress | None = None
    if encoding in ("gzip", "x-gzip", "deflate"):
        inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # accepts gzip and zlib headers
    elif encoding not in ("", "identity"):
        raise NetError(f"unsupported content encoding {encoding!r}")
    body = bytearray()
    async for chunk in response.aiter_raw():
        if inflater is not None:
            try:
                # One byte beyond the cap is enough to know the body is longer.
                chunk = inflater.decompress(chunk, max_bytes + 1 - len(body))
            except zlib.error as exc:
                raise NetError(f"bad {encoding} body: {exc}") from None
        body += chunk
        if len(body) > max_bytes:
            return bytes(body[:max_bytes]), True
    return bytes(body), False


def _decode(body: bytes, charset: str | None, truncated: bool) -> str:
    try:
        decoder = codecs.getincrementaldecoder(charset or "utf-8")(errors="replace")
    except LookupError:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    # final=False on a cut body drops a character split by the cut instead of garbling it.
    return decoder.decode(body, final=not truncated)


class _Reply(NamedTuple):
    status: int
    address: str
    content_type: str
    location: httpx.URL | None  # set for a redirect
    text: str = ""
    truncated: bool = False


async def _hop(
    target: _Target,
    addresses: list[str],
    *,
    transport: httpx.AsyncBaseTransport | None,
    timeout_s: float,
    max_bytes: int,
) -> _Reply:
    """One request, to the first checked address that accepts a connection."""
    https = target.url.scheme == "https"
    headers = {
        # The original authority, so virtual hosting works although the URL now holds an IP.
        "Host": target.url.netloc.decode("ascii"),
        "User-Agent": USER_AGENT,
        "Accept": "text/html, text/plain, application/json, text/*;q=0.9, */*;q=0.1",
        "Accept-Encoding": "identity",
    }
    # SNI and certificate verification use the name; an IP literal URL verifies against the IP.
    extensions = {"sni_hostname": target.host} if https and target.literal is None else {}
    failures: list[str] = []
    # A fresh pool per hop: a kept-alive TLS connection to this IP must never serve another name.
    async with _client(transport, timeout_s) as client:
        for ip in addresses:
            request = client.build_request("GET", target.url.copy_with(host=ip), headers=headers, extensions=extensions)
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                # Another checked address of the same name may answer (dual-stack hosts).
                failures.append(f"{ip}: {exc or type(exc).__name__}")
                continue
            try:
                content_type = response.headers.get("content-type", "")
                if response.status_code in REDIRECT_STATUSES and "location" in response.headers:
                    try:
                        location = target.url.join(response.headers["location"])
                    except httpx.InvalidURL as exc:
                        raise NetError(f"bad redirect location from {target.url}: {exc}") from None
                    return _Reply(response.status_code, ip, content_type, location)
                mime = content_type.split(";", 1)[0].strip().lower()
                if mime and not _is_text(mime):
                    raise NetError(f"unsupported content type {mime} (only text is returned)")
                body, truncated = await _read_capped(response, max_bytes)
                if not mime and b"\x00" in body:
                    raise NetError("unsupported content: a binary body without a content type")
                text = _decode(body, response.charset_encoding, truncated)
                return _Reply(response.status_code, ip, content_type, None, text, truncated)
            finally:
                # Closing mid-body drops the connection: nothing beyond the cap is read.
                await response.aclose()
    raise NetError(f"could not connect to {target.host}:{target.port} ({'; '.join(failures)})")


async def _fetch(
    url: str,
    allow: AllowList,
    timeout_s: float,
    max_bytes: int,
    max_redirects: int,
    resolver: Resolver,
    transport: httpx.AsyncBaseTransport | None,
) -> FetchResult:
    current = url
    for _ in range(max_redirects + 1):
        target = _target(current)
        addresses = await _addresses(target, allow, resolver)
        reply = await _hop(target, addresses, transport=transport, timeout_s=timeout_s, max_bytes=max_bytes)
        if reply.location is None:
            return FetchResult(
                url, str(target.url), reply.status, reply.content_type, reply.text, reply.truncated, reply.address
            )
        current = str(reply.location)
    raise NetError(f"too many redirects (more than {max_redirects}) fetching {url}")


async def fetch(
    url: str,
    *,
    allow: AllowList = AllowList(),
    timeout_s: float = 10.0,
    max_bytes: int = 1_000_000,
    max_redirects: int = 3,
    resolver: Resolver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FetchResult:
    """GET a public http(s) URL and return its text; NetError for anything refused or failed.

    ``timeout_s`` bounds the whole fetch, redirects and DNS included. ``transport`` is for
    tests: it receives requests already pinned (URL host = the checked IP, ``Host`` header and
    ``sni_hostname`` = the name) and stays open afterwards.
    """
    try:
        async with asyncio.timeout(timeout_s):
            return await _fetch(url, allow, timeout_s, max_bytes, max_redirects, resolver or system_resolver, transport)
    except TimeoutError:
        raise NetError(f"timed out after {timeout_s:g}s fetching {url}") from None
    except httpx.TimeoutException:
        raise NetError(f"timed out after {timeout_s:g}s fetching {url}") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise NetError(f"fetching {url} failed: {type(exc).__name__}: {exc}") from None
