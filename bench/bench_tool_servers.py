"""Tenants' tool servers (issue 44): what the mesh adds to a call of a remote MCP tool, and how long
a failover takes, against direct calls to the same server in the same run. Loopback, real
processes: two replicas of the example orders server (streamable HTTP, bearer token), the mesh's
services, NATS and Redis.

- per call: ``get_order`` one at a time, ``--calls`` of them, direct (``remote.Endpoint``: the MCP
  SDK's client over streamable HTTP, the same one the tool-executor holds) vs through the mesh
  (``tool.requested`` on the bus to ``tool.completed``: door-free worker path, validation, policy,
  ledger claim and record, rate limit, routing, answer);
- failover: a ``refund_order`` whose replica is SIGKILLed after its effect and before its answer,
  ``--kills`` times: from the kill to the answer from the other replica (one refund each time);
- a dead replica: the first call after a replica died (idle), before any health check noticed.

    python bench/bench_tool_servers.py [--calls 60] [--kills 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from mesh_contracts.registry import open_body
from mesh_contracts.v1 import ToolRequested
from mesh_testing.chaos import started
from mesh_testing.infra import Infra, running_infra
from mesh_testing.tool_servers import Replica, free_port, orders_state
from mesh_tool_executor.remote import Auth, Endpoint, EndpointConfig
from meshctl.cli import main as cli_main

TOKEN = "bench-token-0c4d"  # noqa: S105 - a throwaway token of a loopback test server


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:7.1f} / {pct(xs, 0.95) * 1000:7.1f} ms"


async def direct(url: str, secrets: Path, n: int) -> list[float]:
    ep = Endpoint(EndpointConfig(url, auth=Auth("bearer", "orders-token"), secrets_dir=secrets), label="bench")
    out = []
    try:
        await ep.connect()
        for i in range(n):
            t0 = time.perf_counter()
            result = await ep.call("get_order", {"order_id": f"o-{1 + i % 9}"}, timeout_s=30)
            out.append(time.perf_counter() - t0)
            assert not result.is_error
    finally:
        await ep.close()
    return out


class Bus:
    """Calls as a worker makes them: ``tool.requested`` published, ``tool.completed`` awaited."""

    def __init__(self, infra: Infra) -> None:
        self.infra = infra
        self.waiting: dict[str, asyncio.Future[Any]] = {}

    async def __aenter__(self) -> Bus:
        self._worker = self.infra.connected_as("worker")
        self.worker = await self._worker.__aenter__()
        self.admin = await self.infra.admin()

        async def on(msg: Any) -> None:
            fut = self.waiting.pop(msg.subject.split(".")[3], None)
            if fut is not None and not fut.done():
                fut.set_result(open_body(msg.subject, msg.data))

        await self.admin.subscribe("tool.*.acme.*.completed", cb=on)
        await self.admin.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.admin.close()
        await self._worker.__aexit__(*exc)

    async def call(self, tool: str, arguments: dict[str, Any], task: str = "") -> tuple[float, dict[str, Any]]:
        task = task or f"b-{uuid.uuid4().hex[:10]}"
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.waiting[task] = fut
        t0 = time.perf_counter()
        await self.worker.publish(ToolRequested(tenant="acme", task_id=task, step_id="s1", call_id="c1", tool=tool,
                                                arguments=arguments), key="c1")  # fmt: skip
        answer = await asyncio.wait_for(fut, 60)
        return time.perf_counter() - t0, dict(answer)


async def until_listed(infra: Infra, tools: set[str]) -> None:
    nc = await infra.admin()
    try:
        kv = await nc.jetstream().key_value("toolservers")
        while True:
            with contextlib.suppress(Exception):  # not written yet
                names = {t["name"] for t in json.loads((await kv.get("acme.catalogue")).value)["tools"]}
                if tools <= names:
                    return
            await asyncio.sleep(0.2)
    finally:
        await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--kills", type=int, default=5)
    args = ap.parse_args()
    place = Path(tempfile.mkdtemp(prefix="bench-tools-"))
    (place / "token").write_text(TOKEN)
    secrets = place / "secrets"
    (secrets / "acme").mkdir(parents=True)
    (secrets / "acme" / "orders-token").write_text(TOKEN)
    env = {"MESH_ORDERS_STATE": str(place / "orders.json"), "MESH_ORDERS_TOKEN_FILE": str(place / "token"),
           "MESH_ORDERS_DELAY_S": "1"}  # fmt: skip
    replicas = [Replica("r1", free_port(), env), Replica("r2", free_port(), env)]
    for r in replicas:
        r.start()
    try:
        mesh_env = {"MESH_LOG_LEVEL": "WARNING", "MESH_TOOL_SECRETS_DIR": str(secrets)}
        with running_infra(["acme"], name="bench-tools") as infra, started(infra, mesh_env):

            def ctl(*a: str) -> int:
                return cli_main(["--home", str(infra.home), *a, "--nats-url", infra.nats_url])

            assert ctl("authors", "add", "alice", "--tenant", "acme") == 0
            assert ctl("approvers", "add", "bob", "--tenant", "acme") == 0
            assert ctl("tools", "add", "orders", "--endpoint", replicas[0].url, "--endpoint", replicas[1].url,
                       "--bearer", "orders-token", "--rule", "get_order=read", "--rule", "refund_order=write",
                       "--as", "author.acme.alice") == 0  # fmt: skip
            time.sleep(3)  # its first listing
            assert ctl("tools", "approve", "orders", "--all", "--as", "approver.acme.bob") == 0
            asyncio.run(until_listed(infra, {"orders__get_order", "orders__refund_order"}))
            asyncio.run(run(args, infra, replicas, secrets, place))
    finally:
        for r in replicas:
            r.stop()


async def run(args: argparse.Namespace, infra: Infra, replicas: list[Replica], secrets: Path, place: Path) -> None:
    await direct(replicas[0].url, secrets / "acme", 5)  # warm
    d = await direct(replicas[0].url, secrets / "acme", args.calls)
    async with Bus(infra) as bus:
        for _ in range(5):
            await bus.call("orders__get_order", {"order_id": "o-1"})
        m = []
        for i in range(args.calls):
            seconds, answer = await bus.call("orders__get_order", {"order_id": f"o-{1 + i % 9}"})
            assert answer["ok"], answer
            m.append(seconds)
        failovers, detections = [], []
        for k in range(args.kills):
            order = f"o-{1 + k % 9}"
            task = f"kill-{k}"
            call = asyncio.create_task(bus.call("orders__refund_order", {"order_id": order, "amount": 1}, task))
            key = f"tool-executor.acme.{task}.c1"
            while not [r for r in orders_state(place / "orders.json").get("refunds", []) if r["key"] == key]:
                await asyncio.sleep(0.005)  # the effect is done; the replica sleeps before answering
            (done,) = [r for r in orders_state(place / "orders.json")["refunds"] if r["key"] == key]
            victim = next(r for r in replicas if r.name == done["replica"])
            t_kill = time.perf_counter()
            victim.kill()
            _, answer = await call
            failovers.append(time.perf_counter() - t_kill)
            attempts = answer["route"]["attempts"]
            assert answer["ok"] and [a["outcome"] for a in attempts] == ["lost", "ok"], answer
            detections.append(attempts[1]["latency_ms"] / 1000)
            victim.start()
            await asyncio.sleep(2.0)  # the next health check finds it back
        refunds = orders_state(place / "orders.json")["refunds"]
        assert len(refunds) == args.kills, f"one refund per call: {refunds}"
        replicas[1].kill()  # idle; no check has seen it yet
        seconds, answer = await bus.call("orders__get_order", {"order_id": "o-2"})
        dead = [a["outcome"] for a in answer["route"]["attempts"]]
        replicas[1].start()
    print(f"tool-server bench: get_order one at a time, {args.calls} calls, p50 / p95:")
    print(f"  direct (MCP client, streamable HTTP)  {ms(d)}")
    print(f"  through the mesh (bus, executor)      {ms(m)}   ratio {statistics.median(m) / statistics.median(d):.2f}x,"
          f" overhead {(statistics.median(m) - statistics.median(d)) * 1000:.1f} ms per call")  # fmt: skip
    print(f"  failover, replica SIGKILLed mid-call (after its effect), {args.kills} times: kill to answer {ms(failovers)};"
          f" the other replica's part {ms(detections)}; refunds {len(refunds)} of {args.kills} calls")  # fmt: skip
    print(f"  a call right after an idle replica died: {seconds * 1000:.1f} ms, attempts {dead}")


if __name__ == "__main__":
    main()
