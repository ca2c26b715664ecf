"""Service entry point: settings, logging, telemetry, handlers, run until SIGTERM, drain.

Every service's ``__main__`` is a few lines::

    def main() -> None:
        run_service(build)          # build(mesh) registers handlers

No I/O happens at import time; all state lives in objects created here.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import ValidationError

from mesh_guardrails.logfilter import install as install_log_redaction
from mesh_kit.bus import Mesh
from mesh_kit.health import HealthServer
from mesh_kit.settings import ServiceSettings

Build = Callable[[Mesh], Awaitable[Any]]


def run_service(build: Build, service: str | None = None) -> None:
    """Run one service process until SIGTERM/SIGINT, then drain in-flight work."""
    try:
        settings = ServiceSettings(**({"service": service} if service else {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"configuration error: MESH_{str(first['loc'][0]).upper()}: {first['msg']}", file=sys.stderr)
        raise SystemExit(2) from None
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s {settings.service} %(levelname)s %(name)s: %(message)s"
    )
    install_log_redaction()  # secrets and PII never reach a log line, whoever logged them
    logging.getLogger("faststream").setLevel(logging.WARNING)
    asyncio.run(serve(settings, build))


async def serve(settings: ServiceSettings, build: Build, *, stop: asyncio.Event | None = None) -> None:
    log = logging.getLogger(f"mesh.{settings.service}")
    mesh = Mesh(settings)
    await build(mesh)
    await mesh.start()
    health = None
    if settings.health_port:
        health = HealthServer(
            settings.health_host,
            settings.health_port,
            mesh.ready,
            lambda: {
                "service": settings.service,
                "uptime_s": round(time.time() - mesh.stats.started_at, 1),
                "counters": dict(mesh.stats.counters),
            },
        )
        await health.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("%s ready (nats %s, health port %s)", settings.service, settings.nats_url, settings.health_port or "off")
    stopped, lost = asyncio.create_task(stop.wait()), asyncio.create_task(mesh.lost.wait())
    await asyncio.wait((stopped, lost), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    lost.cancel()
    log.info("draining: finishing in-flight handlers (up to %.0fs)", settings.graceful_timeout_s)
    await mesh.stop()
    if health:
        await health.stop()
    mesh.telemetry.tracer_provider.shutdown()
    mesh.telemetry.meter_provider.shutdown()
    log.info("stopped")
    if mesh.lost.is_set():
        raise SystemExit(3)  # the connection is gone for good: a supervisor restarts the service
