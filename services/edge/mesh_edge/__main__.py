"""``python -m mesh_edge``: connect as the edge, serve HTTP until SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import ssl

import nats
import uvicorn
from pydantic import ValidationError

from mesh_edge.app import Edge
from mesh_edge.settings import EdgeSettings
from mesh_edge.users import Users
from mesh_kit.settings import inbox_prefix

PRINCIPAL = "edge"


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        settings = EdgeSettings()
        users = Users(settings)
    except ValidationError as exc:
        raise SystemExit(f"edge: {EdgeSettings.error_line(exc)}") from None
    except (ValueError, OSError) as exc:
        raise SystemExit(f"edge: {exc}") from None
    tls = ssl.create_default_context(cafile=str(settings.tls_ca_file)) if settings.tls_ca_file else None
    nc = await nats.connect(
        settings.nats_url.split(","), user_credentials=str(settings.creds_file) if settings.creds_file else None,
        inbox_prefix=inbox_prefix(PRINCIPAL), tls=tls, name=PRINCIPAL, max_reconnect_attempts=-1,
    )  # fmt: skip
    edge = Edge(settings, nc, users)
    config = uvicorn.Config(edge.app(), host=settings.host, port=settings.port, log_level="warning", lifespan="off")
    logging.getLogger("mesh.edge").info("edge serving on http://%s:%d", settings.host, settings.port)
    try:
        await uvicorn.Server(config).serve()
    finally:
        await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
