"""Rollout order: the services may start before provisioning (a Helm release or `kubectl apply`
creates every object at once; NATS may come back empty). Each waits, alive and not ready, saying
what it waits for, and starts by itself once `meshctl provision` has run.

Before this, rag and the tool-executor exited, and the other four reported ready while consuming
nothing, for good: a task submitted after provisioning never finished.

Real nats-server and redis-server, the six services as processes with their own identities.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from mesh_contracts.v1 import TaskCompleted
from mesh_testing.infra import running_infra
from meshctl import local
from meshctl.provision import provision_as_admin

pytestmark = pytest.mark.e2e


def probe(port: int, path: str) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2)


def test_services_started_before_provisioning_wait_then_work():
    with running_infra(["acme"], mode="binaries", name="rollout", provision=False) as infra:
        procs = local.start_services(infra.ids, infra.nats_url)
        try:
            # every service comes up alive, not ready, and says why
            waiting: dict[str, str] = {}
            deadline = time.monotonic() + 60
            while len(waiting) < len(procs) and time.monotonic() < deadline:
                for name, proc in procs.items():
                    assert proc.alive(), f"{name} exited: {Path(proc.log).read_text()[-800:]}"
                    try:
                        ready = probe(proc.http_port, "/readyz")
                    except httpx.HTTPError:
                        continue  # not listening yet
                    assert probe(proc.http_port, "/healthz").status_code == 200, name
                    if "waiting for provisioning" in ready.json()["reason"]:
                        assert ready.status_code == 503, name
                        waiting[name] = ready.json()["reason"]
                time.sleep(0.2)
            assert sorted(waiting) == sorted(procs), waiting
            assert "run `meshctl provision`" in waiting["worker"] and "not found" in waiting["worker"]

            time.sleep(2)  # still waiting, still alive: nothing gives up
            assert all(p.alive() for p in procs.values())

            asyncio.run(provision_as_admin(infra.ids, infra.nats_url))
            asyncio.run(local.wait_ready(procs, timeout=30))  # by themselves, no restart

            async def one_task():
                async with infra.client("acme") as c:
                    return await c.submit("What is 2 + 2?", timeout=60)

            seen = asyncio.run(one_task())
            assert isinstance(seen.outcome, TaskCompleted), seen.outcome
            for name, proc in procs.items():
                assert "provisioned after" in Path(proc.log).read_text(), name
        finally:
            local.stop([list(procs.values())], 20.0)
