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
