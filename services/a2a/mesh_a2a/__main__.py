"""``python -m mesh_a2a``: connect as the A2A gateway, serve HTTP until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import ssl

import nats
import uvicorn
from pydantic import ValidationError

from mesh_a2a.app import gateway
from mesh_a2a.settings import A2aSettings
from mesh_edge.users import Users
from mesh_kit.settings import inbox_prefix

PRINCIPAL = "a2a"


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = A2aSettings()
        users = Users(settings.as_edge())
    except ValidationError as exc:
        raise SystemExit(f"a2a: {A2aSettings.error_line(exc)}") from None
    except (ValueError, OSError) as exc:
        raise SystemExit(f"a2a: {str(exc).replace('MESH_EDGE_', 'MESH_A2A_')}") from None
    tls = ssl.create_default_context(cafile=str(settings.tls_ca_file)) if settings.tls_ca_file else None
    nc = await nats.connect(
        settings.nats_url.split(","), user_credentials=str(settings.creds_file) if settings.creds_file else None,
        inbox_prefix=inbox_prefix(PRINCIPAL), tls=tls, name=PRINCIPAL, max_reconnect_attempts=-1,
    )  # fmt: skip
    served = gateway(settings, nc, users)
    config = uvicorn.Config(served.app(), host=settings.host, port=settings.port, log_level="warning", lifespan="off")
    logging.getLogger("mesh.a2a").info("a2a gateway serving on http://%s:%d", settings.host, settings.port)
    try:
        await uvicorn.Server(config).serve()
    finally:
        await served.close()
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
