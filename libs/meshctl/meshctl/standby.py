"""Warm standbys of a local mesh's services (``meshctl up --standby``).

A restart of a killed service process costs about a CPU-second before the process can even
connect: Python importing the service, its model gateway, FastStream, nats-py, OpenTelemetry
and pydantic. With ``--standby`` the supervisor keeps one process per service that has done
that already (``python -m mesh_<service> --standby``, ``mesh_host.runtime.await_activation``)
and waits, blocked on its stdin. When a process of that service exits, the standby is told to
make a copy of itself that process (its health port, its log, its hand-off file): it forks
(``fork``: milliseconds, the copy shares its pages) and stays, for the next restart. The copy
only connects, waits for its durables and starts consuming. Forked twice, the copy is given to
the supervisor (its subreaper, ``meshctl.reaper``), whose child it then is.

Without a subreaper (not Linux) a standby is used once (``activate``: it becomes the process
itself) and a new one is started once every process is ready again, so it never takes CPU from a
recovery.

The cost: one idle Python process per service (67-78 MB resident each, measured) for as long as the mesh
runs. A standby whose supervisor is gone reads the end of its input and exits, having done
nothing; ``meshctl down`` stops them with the supervisor.
"""

from __future__ import annotations

import contextlib
import json
import select
import subprocess
import sys

from mesh_host.runtime import STANDBY
from meshctl import local, reaper
from meshctl.identity import Identities
from meshctl.local import Proc


def spawn(ids: Identities, nats_url: str, service: str, *, forking: bool = False) -> Proc:
    """A standby of ``service``: imported, holding, its output in ``logs/<service>.standby.log``
    until it is activated. Its environment is a restart's (``local.service_env``), bar the port
    and the hand-off file. ``forking``: it answers on its stdout (``fork``)."""
    env = local.service_env(ids, service, nats_url, 0, {})
    argv = [sys.executable, "-m", local.module_of(service), STANDBY]
    proc = local.spawn(
        f"{service}.standby", argv, ids.home / "logs" / f"{service}.standby.log", env, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE if forking else None,
    )  # fmt: skip
    proc.service = service
    return proc


FORK_ANSWER_S = 5.0
"""How long the supervisor waits for a standby to say the pid of its copy (a fork: milliseconds)."""


def fork(spare: Proc, ids: Identities, *, name: str, http_port: int, log_path: str) -> Proc | None:
    """A copy of ``spare`` made the process ``name`` (its health port, log and hand-off file),
    ``spare`` standing by still: the new ``Proc`` (adopted: ``reaper``), or None
    when the standby is gone or cannot fork (the process is then started cold)."""
    popen = local.child(spare)
    if popen is None or popen.stdin is None or popen.stdout is None or popen.poll() is not None:
        return None
    try:
        popen.stdin.write(_order(ids, name, http_port, log_path, fork=True))
        popen.stdin.flush()
    except OSError:
        return None
    ready, _, _ = select.select([popen.stdout], [], [], FORK_ANSWER_S)
    line = popen.stdout.readline() if ready else b""
    try:
        pid = int(json.loads(line).get("pid", 0)) if line else 0
    except (ValueError, AttributeError):
        pid = 0
    if pid <= 0:
        # No answer, or not a pid: a late answer would be read as the next copy's pid. End it;
        # the supervisor counts it as a standby that failed and starts another.
        popen.kill()
        return None
    stat = local.proc_stat(pid)
    if stat is None:  # gone already (killed at once): a cold start
        return None
    reaper.adopt(pid)
    new = Proc(name, pid, spare.argv, log_path, 0, http_port, started=int(stat[19]))
    new.service = spare.service
    return new


def _order(ids: Identities, name: str, http_port: int, log_path: str, *, fork: bool) -> bytes:
    """The line that makes a standby (or its copy) the process ``name``: its health port, hand-off
    file and log (``mesh_host.runtime.await_activation``)."""
    env = {"MESH_HEALTH_PORT": str(http_port), "MESH_HANDOFF_FILE": local.handoff_file(ids, name)}
    return (json.dumps({"env": env, "log": log_path, **({"fork": True} if fork else {})}) + "\n").encode()


def activate(spare: Proc, ids: Identities, *, name: str, http_port: int, log_path: str) -> Proc | None:
    """Make ``spare`` the process ``name`` (its health port, log and hand-off file): the new ``Proc``, or None
    when the standby is gone (it is then started cold)."""
    popen = local.child(spare)
    if popen is None or popen.stdin is None or popen.poll() is not None:
        return None
    try:
        popen.stdin.write(_order(ids, name, http_port, log_path, fork=False))
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
        if popen.stdout is not None:
            popen.stdout.close()
    try:
        popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
