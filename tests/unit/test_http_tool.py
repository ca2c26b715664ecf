"""The SSRF-safe HTTP GET (mesh_tool_executor.net) against a real local server and fake DNS.

The local server stands in for everything an attacker would like to reach (it listens on
loopback), so "refused" is checked by the server never seeing the request. Public destinations
are faked: a resolver maps test names to public IPs and an httpx MockTransport plays the remote
server, asserting what a real connection would have been made to.
"""

from __future__ import annotations

import gzip
import ipaddress
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mesh_tool_executor.net import AllowList, NetError, check_address, fetch

pytestmark = pytest.mark.unit

PUBLIC = "93.184.216.34"
LOOPBACK = AllowList.parse("127.0.0.1/32")
BIG = 200_000


@dataclass
class LocalServer:
    port: int
    seen: list[tuple[str, str]] = field(default_factory=list)  # (path, Host header)
    sni: list[str | None] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def _handler(server: LocalServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.seen.append((self.path, self.headers.get("Host", "")))
            routes: dict[str, Callable[[], None]] = {
                "/text": lambda: self._send(200, "text/plain; charset=utf-8", b"hello from the mesh"),
                "/latin1": lambda: self._send(200, "text/html; charset=iso-8859-1", "café".encode("latin-1")),
                "/json": lambda: self._send(200, "application/json", b'{"ok": true}'),
                "/big": lambda: self._send(200, "text/plain", b"a" * BIG),
                "/utf8-cut": lambda: self._send(200, "text/plain; charset=utf-8", ("é" * 10).encode()),
                "/gzip": lambda: self._send(
                    200, "text/plain", gzip.compress(b"z" * 5_000_000), {"Content-Encoding": "gzip"}
                ),
                "/binary": lambda: self._send(200, "image/png", b"\x89PNG\r\n\x1a\n\x00\x00"),
                "/redirect-local": lambda: self._send(302, "text/plain", b"", {"Location": "/text"}),
                "/redirect-metadata": lambda: self._send(
                    302, "text/plain", b"", {"Location": "http://169.254.169.254/latest/meta-data/"}
                ),
                "/redirect-loop": lambda: self._send(302, "text/plain", b"", {"Location": "/redirect-loop"}),
                "/slow": self._slow,
            }
            routes.get(self.path, lambda: self._send(404, "text/plain", b"not found"))()

        def _slow(self) -> None:
            server.release.wait(5)
            self._send(200, "text/plain", b"late")

        def _send(self, status: int, ctype: str, body: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client stopped reading (truncation, timeout): expected

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # client-side aborts (refused TLS, timeouts) are part of the tests


def _serve(tls: ssl.SSLContext | None = None) -> Iterator[LocalServer]:
    httpd = _Quiet(("127.0.0.1", 0), BaseHTTPRequestHandler)
    server = LocalServer(port=httpd.server_address[1])
    httpd.RequestHandlerClass = _handler(server)
    if tls is not None:
        tls.sni_callback = lambda sock, name, ctx: server.sni.append(name)
        httpd.socket = tls.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture
def local() -> Iterator[LocalServer]:
    yield from _serve()


class FakeDNS:
    """A resolver from a table; each entry is a list of answers, one per lookup (the last repeats)."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answers = self.table[host]
        return answers[min(len(self.calls_for(host)) - 1, len(answers) - 1)]

    def calls_for(self, host: str) -> list[str]:
        return [h for h in self.calls if h == host]


@dataclass
class Remote:
    """A MockTransport playing public servers; records what a real connection would have hit."""

    routes: dict[str, httpx.Response]
    requests: list[httpx.Request] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return self.routes.get(request.url.path, httpx.Response(404, text="nope"))

        return httpx.MockTransport(handle)


def _redirect(location: str) -> httpx.Response:
    return httpx.Response(302, headers={"Location": location})


# --- addresses and the allow-list -------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("10.0.0.5", "private"),
        ("172.16.3.4", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("100.64.0.1", "shared"),
        ("0.0.0.0", "unspecified"),  # noqa: S104 - an address to refuse, not to bind
        ("224.0.0.251", "multicast"),
        ("240.0.0.1", "private"),  # Python files 240/4 under is_private
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("::", "unspecified"),
        ("ff02::1", "multicast"),
        ("::ffff:127.0.0.1", "IPv6 form of 127.0.0.1"),
        ("2002:a00:1::", "IPv6 form of 10.0.0.1"),  # 6to4
        ("64:ff9b::a9fe:a9fe", "IPv6 form of 169.254.169.254"),  # NAT64
    ],
)
def test_non_public_addresses_are_refused(ip: str, kind: str) -> None:
    with pytest.raises(NetError, match=kind) as err:
        check_address("example.internal", ip, AllowList())
    message = str(err.value)
    assert message.startswith("refused: ") and "MESH_HTTP_ALLOW" in message and "\n" not in message
    assert "(example.internal resolves to it)" in message


@pytest.mark.parametrize("ip", [PUBLIC, "8.8.8.8", "2606:4700:4700::1111", "2002:5db8:d822::"])
def test_public_addresses_pass(ip: str) -> None:
    check_address("example.test", ip, AllowList())


def test_message_names_the_host_and_the_fix() -> None:
    with pytest.raises(NetError) as err:
        check_address("example.internal", "10.0.0.5", AllowList())
    assert str(err.value) == (
        "refused: 10.0.0.5 is a private address (example.internal resolves to it); allow-list it with MESH_HTTP_ALLOW"
    )


def test_allow_list_parse_and_permits(monkeypatch: pytest.MonkeyPatch) -> None:
    allow = AllowList.parse(" 127.0.0.1/32, localhost,Intranet.ACME.test., 10.0.0.0/8 ,::1,")
    assert allow.hosts == {"localhost", "intranet.acme.test"}
    assert [str(n) for n in allow.networks] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    assert allow.permits("intranet.acme.test.", ipaddress.ip_address("192.168.9.9"))
    assert allow.permits("x.test", ipaddress.ip_address("10.1.2.3"))
    assert allow.permits("x.test", ipaddress.ip_address("::ffff:127.0.0.1"))  # same destination
    assert not allow.permits("x.test", ipaddress.ip_address("127.0.0.2"))
    check_address("intranet.acme.test", "192.168.9.9", allow)

    from mesh_tool_executor.settings import ToolExecutorSettings

    required = {"service": "tool-executor", "signing_key_file": "k", "trust_bundle_file": "b"}
    monkeypatch.setenv("MESH_HTTP_ALLOW", "localhost")
    assert ToolExecutorSettings(**required).allow == AllowList(frozenset({"localhost"}))
    monkeypatch.delenv("MESH_HTTP_ALLOW")
    assert ToolExecutorSettings(**required).allow == AllowList()


@pytest.mark.parametrize(
    ("spec", "reason"),
    [("10.0.0.1/8", "host bits set"), ("*.corp", "wildcards"), ("1.2.3.4.5", "not a valid IP network"), ("a b", "")],
)
def test_allow_list_rejects_bad_entries(spec: str, reason: str) -> None:
    with pytest.raises(ValueError, match="MESH_HTTP_ALLOW") as err:
        AllowList.parse(f"localhost,{spec}")
    assert reason in str(err.value) and "\n" not in str(err.value)


# --- the local server: loopback refused unless allow-listed ----------------------------------


async def test_loopback_refused_by_default(local: LocalServer) -> None:
    with pytest.raises(NetError, match=r"127\.0\.0\.1 is a loopback address"):
        await fetch(local.url("/text"))
    assert local.seen == []


async def test_loopback_allowed_by_cidr(local: LocalServer) -> None:
    result = await fetch(local.url("/text"), allow=LOOPBACK)
    assert (result.status, result.text, result.truncated, result.address) == (
        200,
        "hello from the mesh",
        False,
        "127.0.0.1",
    )
    assert result.content_type.startswith("text/plain")
    assert local.seen == [("/text", f"127.0.0.1:{local.port}")]


async def test_allowed_by_host_name_connects_to_the_checked_ip_with_the_host_header(local: LocalServer) -> None:
    dns = FakeDNS({"intranet.acme.test": [["127.0.0.1"]]})
    url = local.url("/json", host="intranet.acme.test")
    with pytest.raises(NetError, match=r"\(intranet.acme.test resolves to it\)"):
        await fetch(url, resolver=dns)
    result = await fetch(url, allow=AllowList.parse("intranet.acme.test"), resolver=dns)
    assert result.text == '{"ok": true}' and result.final_url == url
    assert local.seen == [("/json", f"intranet.acme.test:{local.port}")]


async def test_localhost_through_the_system_resolver_is_refused(local: LocalServer) -> None:
    with pytest.raises(NetError, match=r"is a loopback address \(localhost resolves to it\)"):
        await fetch(local.url("/text", host="localhost"))
    assert local.seen == []


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",  # decimal
        "0x7f.1",  # hex, short form
        "0x7f000001",
        "017700000001",  # octal
        "127.1",
        "[::1]",
        "[::ffff:127.0.0.1]",  # IPv4-mapped
        "[::ffff:7f00:1]",
        "[2002:7f00:1::]",  # 6to4 around 127.0.0.1
        "0.0.0.0",  # noqa: S104 - an address to refuse, not to bind
        "[::]",
        "0",
        "0177.0.0.1",  # httpx itself calls this one an invalid URL
        "1.2.3.4.5",  # malformed numeric: refused, never handed to DNS
        "foo.0x7f",
    ],
)
async def test_every_spelling_of_a_private_ip_is_refused_without_a_connection(local: LocalServer, host: str) -> None:
    dns = FakeDNS({})
    with pytest.raises(NetError, match=r"^(refused: |invalid URL)"):
        await fetch(local.url("/text", host=host), resolver=dns)
    assert local.seen == [] and dns.calls == []


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "gopher://127.0.0.1:70/_x", "ftp://example.test/", "javascript:alert(1)"]
)
async def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(NetError, match="scheme"):
        await fetch(url, allow=LOOPBACK)


@pytest.mark.parametrize("userinfo", ["user:pass@", "user@", ":pass@"])
async def test_credentials_in_the_url_are_refused(local: LocalServer, userinfo: str) -> None:
    with pytest.raises(NetError, match="credentials"):
        await fetch(f"http://{userinfo}127.0.0.1:{local.port}/text", allow=LOOPBACK)
    assert local.seen == []


async def test_local_redirect_is_followed(local: LocalServer) -> None:
    result = await fetch(local.url("/redirect-local"), allow=LOOPBACK)
    assert result.text == "hello from the mesh"
    assert result.url == local.url("/redirect-local") and result.final_url == local.url("/text")
    assert [path for path, _ in local.seen] == ["/redirect-local", "/text"]


async def test_redirect_to_metadata_refused_although_the_first_hop_is_allowed(local: LocalServer) -> None:
    with pytest.raises(NetError, match=r"169\.254\.169\.254 is the cloud metadata address"):
        await fetch(local.url("/redirect-metadata"), allow=LOOPBACK)


async def test_redirects_are_capped(local: LocalServer) -> None:
    with pytest.raises(NetError, match=r"too many redirects \(more than 2\)"):
        await fetch(local.url("/redirect-loop"), allow=LOOPBACK, max_redirects=2)
    assert len(local.seen) == 3


async def test_body_is_capped(local: LocalServer) -> None:
    result = await fetch(local.url("/big"), allow=LOOPBACK, max_bytes=1000)
    assert result.truncated and result.text == "a" * 1000
    whole = await fetch(local.url("/big"), allow=LOOPBACK, max_bytes=BIG)
    assert not whole.truncated and len(whole.text) == BIG


async def test_a_cut_through_a_character_drops_it(local: LocalServer) -> None:
    result = await fetch(local.url("/utf8-cut"), allow=LOOPBACK, max_bytes=5)  # é is 2 bytes
    assert result.truncated and result.text == "éé"


async def test_compressed_body_is_capped_after_inflating(local: LocalServer) -> None:
    result = await fetch(local.url("/gzip"), allow=LOOPBACK, max_bytes=10_000)
    assert result.truncated and result.text == "z" * 10_000


async def test_charset_is_honoured(local: LocalServer) -> None:
    assert (await fetch(local.url("/latin1"), allow=LOOPBACK)).text == "café"


async def test_binary_content_is_refused(local: LocalServer) -> None:
    with pytest.raises(NetError, match="unsupported content type image/png"):
        await fetch(local.url("/binary"), allow=LOOPBACK)


async def test_timeout_is_a_net_error(local: LocalServer) -> None:
    with pytest.raises(NetError, match=r"timed out after 0.3s"):  # (the page would come, but later)
        await fetch(local.url("/slow"), allow=LOOPBACK, timeout_s=0.3)


async def test_environment_proxies_are_ignored(local: LocalServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy does its own DNS: using one would undo the pinning. Port 9 (discard) refuses.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert (await fetch(local.url("/text"), allow=LOOPBACK)).text == "hello from the mesh"


@pytest.mark.parametrize(("answers", "message"), [([], "no addresses"), (["not-an-ip"], "which is not an IP address")])
async def test_odd_resolver_answers_are_refused(answers: list[str], message: str) -> None:
    remote = Remote({})
    with pytest.raises(NetError, match=message):
        await fetch("http://odd.test/", resolver=FakeDNS({"odd.test": [answers]}), transport=remote.transport())
    assert remote.requests == []


async def test_connection_refused_is_a_net_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(NetError, match=f"could not connect to 127.0.0.1:{port}"):
        await fetch(f"http://127.0.0.1:{port}/", allow=LOOPBACK, timeout_s=2)


# --- public destinations: fake DNS, mock remote -----------------------------------------------


async def test_public_host_is_pinned_to_the_resolved_ip() -> None:
    dns = FakeDNS({"example.test": [[PUBLIC]]})
    remote = Remote({"/page": httpx.Response(200, text="public page", headers={"Content-Type": "text/html"})})
    result = await fetch("https://Example.TEST/page?q=1#frag", resolver=dns, transport=remote.transport())
    assert (result.status, result.text, result.address) == (200, "public page", PUBLIC)
    assert result.final_url == "https://example.test/page?q=1"
    (request,) = remote.requests
    assert str(request.url) == f"https://{PUBLIC}/page?q=1"  # connects to the IP ...
    assert request.headers["host"] == "example.test"  # ... speaks to the name ...
    assert request.extensions["sni_hostname"] == "example.test"  # ... and verifies the name's certificate
    assert dns.calls == ["example.test"]


async def test_dns_rebinding_gets_no_second_lookup() -> None:
    # First answer public, every later answer loopback: a client that resolves again to connect
    # would reach 127.0.0.1.
    dns = FakeDNS({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    remote = Remote({"/": httpx.Response(200, text="ok")})
    result = await fetch("http://rebind.test/", resolver=dns, transport=remote.transport())
    assert result.address == PUBLIC and dns.calls == ["rebind.test"]
    assert [r.url.host for r in remote.requests] == [PUBLIC]


async def test_each_hop_is_resolved_once_and_checked() -> None:
    dns = FakeDNS({"rebind.test": [[PUBLIC], ["127.0.0.1"]]})
    remote = Remote({"/start": _redirect("/next"), "/next": httpx.Response(200, text="unreachable")})
    with pytest.raises(NetError, match=r"127.0.0.1 is a loopback address \(rebind.test resolves to it\)"):
        await fetch("http://rebind.test/start", resolver=dns, transport=remote.transport())
    assert dns.calls == ["rebind.test", "rebind.test"]  # one lookup per hop
    assert [r.url.path for r in remote.requests] == ["/start"]


async def test_one_private_answer_refuses_the_host() -> None:
    dns = FakeDNS({"mixed.test": [[PUBLIC, "10.0.0.5"]]})
    remote = Remote({})
    with pytest.raises(NetError, match=r"10.0.0.5 is a private address \(mixed.test resolves to it\)"):
        await fetch("http://mixed.test/", resolver=dns, transport=remote.transport())
    assert remote.requests == []


async def test_public_redirect_to_loopback_is_refused(local: LocalServer) -> None:
    dns = FakeDNS({"example.test": [[PUBLIC]], "evil.test": [["10.0.0.5"]]})
    for location in (local.url("/text"), f"http://2130706433:{local.port}/text", "http://evil.test/"):
        remote = Remote({"/go": _redirect(location)})
        with pytest.raises(NetError, match=r"^refused: "):
            await fetch("http://example.test/go", resolver=dns, transport=remote.transport())
        assert len(remote.requests) == 1
    assert local.seen == []


async def test_public_redirect_keeps_the_host_for_relative_locations() -> None:
    dns = FakeDNS({"example.test": [[PUBLIC]], "other.test": [["1.1.1.1"]]})
    remote = Remote(
        {
            "/a": _redirect("/b"),
            "/b": _redirect("https://other.test/c"),
            "/c": httpx.Response(200, text="done"),
        }
    )
    result = await fetch("http://example.test/a", resolver=dns, transport=remote.transport())
    assert (result.text, result.final_url, result.address) == ("done", "https://other.test/c", "1.1.1.1")
    assert [(str(r.url), r.headers["host"]) for r in remote.requests] == [
        (f"http://{PUBLIC}/a", "example.test"),
        (f"http://{PUBLIC}/b", "example.test"),
        ("https://1.1.1.1/c", "other.test"),
    ]


# --- TLS: connecting to the IP still verifies the name's certificate --------------------------


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def test_https_verifies_the_host_name_while_connecting_to_the_ip(tmp_path: Path) -> None:
    cert_file, key_file = _certificate(tmp_path, "secure.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert_file, key_file)
    client_tls = ssl.create_default_context(cafile=str(cert_file))
    dns = FakeDNS({"secure.test": [["127.0.0.1"]], "impostor.test": [["127.0.0.1"]]})
    allow = AllowList.parse("secure.test,impostor.test")
    for server in _serve(server_tls):
        async with httpx.AsyncHTTPTransport(verify=client_tls) as transport:
            result = await fetch(
                f"https://secure.test:{server.port}/text", allow=allow, resolver=dns, transport=transport
            )
            assert result.text == "hello from the mesh" and result.address == "127.0.0.1"
            assert server.sni == ["secure.test"]
            assert server.seen == [("/text", f"secure.test:{server.port}")]
            # Same IP, same certificate, another name: the certificate does not cover it.
            with pytest.raises(NetError, match=r"could not connect to impostor\.test.*CERTIFICATE_VERIFY_FAILED"):
                await fetch(f"https://impostor.test:{server.port}/text", allow=allow, resolver=dns, transport=transport)
            assert len(server.seen) == 1
