"""Service entry point: settings, logging, telemetry, handlers, run until SIGTERM, drain.

Every service's ``__main__`` is a few lines::

    def main() -> None:
        run_service(build, WorkerSettings, service="worker")  # build(mesh, settings) registers handlers

The settings are built once, here, from the environment; ``build`` gets them typed as the
service's own class. No I/O happens at import time; all state lives in objects created here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import IO, Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import SettingsError

from mesh_guardrails.logfilter import install as install_log_redaction
from mesh_host.health import HealthServer
from mesh_host.memory import Trim
from mesh_host.mesh import Mesh
from mesh_kit.settings import ServiceSettings

S = TypeVar("S", bound=ServiceSettings)
Build = Callable[[Mesh, S], Awaitable[Any]]


def load_settings(settings_class: type[S], service: str | None = None) -> S:
    """The service's settings from its environment. A missing or bad value exits 2 with one
    line naming the variable (``configuration error: MESH_MAX_WORKERS: ...``)."""
    try:
        pinned: dict[str, Any] = {"service": service} if service else {}
        return settings_class(**pinned)
    except ValidationError as exc:
        print(f"configuration error: {settings_class.error_line(exc)}", file=sys.stderr)
    except SettingsError as exc:  # a JSON-valued variable that is not JSON
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        print(f"configuration error: {exc}{cause}", file=sys.stderr)
    raise SystemExit(2)


STANDBY = "--standby"
"""``python -m mesh_<service> --standby``: a warm standby (``meshctl up --standby``)."""


def await_activation(orders: IO[str], answers: IO[str] | None = None) -> None:
    """Hold a warm standby until its supervisor makes it, or a copy of it, a process of the mesh.

    Everything the service needs is imported by now (its ``__main__`` imported its service
    module: about a CPU-second of a restart). Orders come as JSON lines on ``orders`` (stdin):
    ``{"env": {...}, "log": path}``, the environment that makes it the process it replaces (its
    health port, its hand-off file) and the log it writes to from now on; then it starts as any
    service process. With ``"fork": true`` it stays the standby: a copy of it (``fork``, a few
    milliseconds) becomes that process, and its pid is answered on ``answers`` (stdout) as
    ``{"pid": N}``, so the standby serves every restart, not only the first. End of input (its
    supervisor is gone) ends it, having done nothing."""
    while True:
        line = orders.readline()
        if not line:
            raise SystemExit(0)
        order = json.loads(line)
        if not order.get("fork"):
            break
        pid = _fork_detached() if threading.active_count() == 1 else -1  # a thread would not be copied
        if pid == 0:
            break  # the copy: it becomes the service
        if answers is not None:
            answers.write(json.dumps({"pid": pid} if pid > 0 else {"error": "could not fork"}) + "\n")
            answers.flush()
    os.environ.update({str(k): str(v) for k, v in order.get("env", {}).items()})
    # A copy must not write into the standby's answers: its output goes somewhere, always.
    if log := order.get("log") or (os.devnull if order.get("fork") else None):
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(fd, sys.stdout.fileno())
        os.dup2(fd, sys.stderr.fileno())
        os.close(fd)


def _fork_detached() -> int:
    """A copy of this process in a session of its own, not its child (forked twice: the
    supervisor, the subreaper, adopts it): 0 in the copy, its pid here, -1 if it failed. The copy
    reads nothing from the standby's orders."""
    r, w = os.pipe()
    first = os.fork()
    if first == 0:  # the intermediate: starts the copy, says its pid, and is gone
        os.close(r)
        try:
            os.setsid()
            second = os.fork()
        except OSError:
            os._exit(1)
        if second:
            os.write(w, f"{second}\n".encode())
            os._exit(0)
        os.close(w)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        return 0
    os.close(w)
    with os.fdopen(r) as said:
        pid = said.readline().strip()
    os.waitpid(first, 0)
    return int(pid) if pid.isdigit() else -1


def run_service(build: Build[S], settings_class: type[S], service: str | None = None) -> None:
    """Run one service process until SIGTERM/SIGINT, then drain in-flight work (a warm standby,
    ``--standby``, first waits to be activated: ``await_activation``)."""
    if STANDBY in sys.argv[1:]:
        await_activation(sys.stdin, sys.stdout)
    settings = load_settings(settings_class, service)
    logging.basicConfig(
        level=settings.log_level.upper(), format=f"%(asctime)s {settings.service} %(levelname)s %(name)s: %(message)s"
    )
    install_log_redaction()  # secrets and PII never reach a log line, whoever logged them
    logging.getLogger("faststream").setLevel(logging.WARNING)
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        runner.run(serve(settings, build))


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a service runs on (``MESH_EVENT_LOOP``): uvloop unless told otherwise, or
    where it is not installed (the platforms it has no build for), then the standard one."""
    if name == "uvloop":
        try:
            import uvloop
        except ImportError:
            logging.getLogger("mesh.runtime").warning("uvloop is not installed: running on asyncio's own event loop")
            return None
        return uvloop.new_event_loop
    return None


async def serve(settings: S, build: Build[S], *, stop: asyncio.Event | None = None) -> None:
    log = logging.getLogger(f"mesh.{settings.service}")
    mesh = Mesh(settings)
    await build(mesh, settings)
    trim = Trim(settings.memory_trim_s, mmap_kib=settings.memory_mmap_kib)
    mesh.report("memory", trim.report)
    trimming = asyncio.create_task(trim.run(), name="memory-trim")  # from the start: a start may be long
    try:
        await _serve(settings, mesh, log, stop)
    finally:
        trimming.cancel()


async def _serve(settings: S, mesh: Mesh, log: logging.Logger, stop: asyncio.Event | None = None) -> None:
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
                "trust_revision": mesh.verifier.bundle.revision,  # the trust bundle in force here
                "dependencies": {name: d.describe() for name, d in mesh.dependencies.items()},
                **{name: source() for name, source in mesh.reports.items()},
            },
        )
        # Before the mesh starts: while it waits for provisioning, /healthz answers (the process
        # is alive) and /readyz says what it waits for.
        await health.start()
    await mesh.start()
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
