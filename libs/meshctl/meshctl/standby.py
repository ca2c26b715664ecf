"""Warm standbys of a local mesh's services (``meshctl up --standby``).

A restart of a killed service process costs about a CPU-second before the process can even
connect: Python importing the service, its model gateway, FastStream, nats-py, OpenTelemetry
and pydantic. With ``--standby`` the supervisor keeps one process per service that has done
that already (``python -m mesh_<service> --standby``, ``mesh_host.runtime.await_activation``)
and waits, blocked on its stdin. When a process of that service exits, the standby is told to be
it (its health port, its log) and only connects, waits for its durables and starts consuming; a
new standby is started once every process is ready again, so it never takes CPU from a recovery.

The cost: one idle Python process per service (67-78 MB resident each, measured) for as long as the mesh
runs. A standby whose supervisor is gone reads the end of its input and exits, having done
nothing; ``meshctl down`` stops them with the supervisor.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

from mesh_host.runtime import STANDBY
from meshctl import local
from meshctl.identity import Identities
from meshctl.local import Proc


def spawn(ids: Identities, nats_url: str, service: str) -> Proc:
    """A standby of ``service``: imported, holding, its output in ``logs/<service>.standby.log``
    until it is activated. Its environment is a restart's (``local.service_env``), bar the port."""
    env = local.service_env(ids, service, nats_url, 0, {})
    argv = [sys.executable, "-m", local.module_of(service), STANDBY]
    proc = local.spawn(
        f"{service}.standby", argv, ids.home / "logs" / f"{service}.standby.log", env, stdin=subprocess.PIPE
    )
    proc.service = service
    return proc


def activate(spare: Proc, *, name: str, http_port: int, log_path: str) -> Proc | None:
    """Make ``spare`` the process ``name`` (its health port and log): the new ``Proc``, or None
    when the standby is gone (it is then started cold)."""
    popen = local.child(spare)
    if popen is None or popen.stdin is None or popen.poll() is not None:
        return None
    order = {"env": {"MESH_HEALTH_PORT": str(http_port)}, "log": log_path}
    try:
        popen.stdin.write((json.dumps(order) + "\n").encode())
        popen.stdin.close()
    except OSError:  # it died between the poll and the write
        return None
    new = Proc(name, spare.pid, spare.argv, log_path, 0, http_port, started=spare.started)
    new.service = spare.service
    return new


def stop(spare: Proc) -> None:
    """End a standby that was never activated (the end of its input: it exits by itself)."""
    popen = local.child(spare)
    if popen is None:
        return
    with contextlib.suppress(OSError):
        if popen.stdin is not None:
            popen.stdin.close()
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
