"""The NATS client port speaks TLS only, with the certificate `meshctl init` minted for it: a
client without the mesh's CA cannot even start a session, one with it can, and a certificate
from another CA is not believed."""

from __future__ import annotations

import asyncio
import ssl
import sys

import nats
import pytest

from mesh_kit.settings import inbox_prefix, nats_servers
from meshctl.identity import Identities

pytestmark = pytest.mark.integration


async def _connect(infra, tls: ssl.SSLContext | None) -> nats.NATS:
    return await nats.connect(
        nats_servers(infra.nats_url), user_credentials=str(infra.ids.creds("worker")), inbox_prefix=inbox_prefix("worker"),
        tls=tls, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3,
    )  # fmt: skip


async def _refused(infra, ca: str) -> str:
    """Connect in a child process (nats-py leaks a refused connection's socket, which warnings-as-
    errors would report in a later test) with a TLS context trusting ``ca`` ('' = the system CAs)."""
    script = (
        "import asyncio, ssl, sys, nats\n"
        "async def main():\n"
        "    ctx = ssl.create_default_context(cafile=sys.argv[2] or None)\n"
        "    try:\n"
        "        await nats.connect(sys.argv[1], user_credentials=sys.argv[3], tls=ctx, allow_reconnect=False,\n"
        "                           max_reconnect_attempts=0, connect_timeout=3)\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e); sys.exit(3)\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, nats_servers(infra.nats_url)[0], ca, str(infra.ids.creds("worker")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 3, "the connection was not refused"
    return out.decode()


async def test_the_client_port_requires_tls_verified_against_the_meshs_ca(integration_infra, tmp_path):
    nc = await _connect(integration_infra, integration_infra.ids.tls_context())
    try:
        assert nc.is_connected and nc._server_info.get("tls_required") is True
    finally:
        await nc.close()
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(integration_infra, ""), "the system CAs do not vouch for it"
    other = Identities(tmp_path / "other")
    other.mint(["acme"])  # another mesh's CA
    assert "CERTIFICATE_VERIFY_FAILED" in await _refused(integration_infra, str(other.tls_ca))


def test_the_server_config_turns_tls_on_for_clients_and_verified_routes(integration_infra):
    ids = integration_infra.ids
    block = ids.tls_block()
    assert 'cert_file: "' in block and "verify" not in block, "clients authenticate with JWTs, not certificates"
    routes = ids.tls_block("  ", routes=True)
    assert "verify: true" in routes and f'ca_file: "{ids.tls_ca}"' in routes, "cluster peers verify each other"
    conf = next((ids.home / "nats").rglob("server.conf")).read_text()
    assert block in conf


_CLIENT = (
    "import asyncio, sys\n"
    "from pathlib import Path\n"
    "from meshctl.client import ConnectFailed, TenantClient\n"
    "from meshctl.identity import Identities\n"
    "async def main():\n"
    "    ids, p = Identities(Path(sys.argv[2])), 'client.acme'\n"
    "    ca = Path(sys.argv[3]) if sys.argv[3] else None\n"
    "    client = TenantClient(sys.argv[1], 'acme', ids.creds(p), ids.signing_key(p), ids.trust_bundle, ca,\n"
    "                          connect_timeout_s=float(sys.argv[4]))\n"
    "    try:\n"
    "        async with client:\n"
    "            print('connected')\n"
    "    except ConnectFailed as e:\n"
    "        print(e); sys.exit(3)\n"
    "asyncio.run(main())\n"
)


async def _tenant_client(url: str, home: str, ca: str, timeout_s: float) -> tuple[int, list[str]]:
    """A ``TenantClient`` in a child process (see ``_refused``): its exit code and output lines.
    The child is given at most 120 s (it must fail, not hang; the connect timeouts are larger
    or far smaller)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, url, home, ca, str(timeout_s),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail("the client hung instead of failing")
    assert not err.strip(), err.decode()
    return proc.returncode or 0, out.decode().splitlines()


async def test_a_tenant_client_without_the_ca_fails_at_once_naming_the_missing_ca(integration_infra):
    """Without the CA the TLS handshake can never succeed; nats-py's endless reconnect loop (its
    first connection included) used to retry it silently for as long as anyone waited. Given a
    connect timeout of 600 s the client fails on the first handshake, in one line."""
    url, home = nats_servers(integration_infra.nats_url)[0], str(integration_infra.home)
    code, lines = await _tenant_client(url, home, "", 600)
    assert code == 3 and len(lines) == 1, lines
    assert "given no CA" in lines[0] and "ca.pem" in lines[0] and "certificate" in lines[0], lines

    code, lines = await _tenant_client(url, home, str(integration_infra.ids.tls_ca), 600)
    assert (code, lines) == (0, ["connected"]), "with the CA it connects"


async def test_a_tenant_client_with_another_ca_or_no_broker_fails_within_its_connect_timeout(
    integration_infra, tmp_path
):
    other = Identities(tmp_path / "other")
    other.mint(["acme"])
    url, home = nats_servers(integration_infra.nats_url)[0], str(integration_infra.home)
    code, lines = await _tenant_client(url, home, str(other.tls_ca), 600)
    assert code == 3 and len(lines) == 1 and f"not signed by the CA in {other.tls_ca}" in lines[0], lines

    from meshctl.local import free_port

    nobody = f"nats://127.0.0.1:{free_port()}"  # nothing listens there: retried until the timeout
    code, lines = await _tenant_client(nobody, home, str(integration_infra.ids.tls_ca), 3)
    assert code == 3 and len(lines) == 1 and f"cannot connect to {nobody} within 3 s" in lines[0], lines
