"""A2A (issue 48): what the A2A gateway costs a task against the same task through the tenant's
own client, in the same run, on the same mesh; and what a step handed to an agent profile costs
against the worker's own step. Loopback, scripted model.

- one task at a time, ``--tasks`` of them, submit to outcome p50 / p95: direct (``TenantClient``)
  vs an a2a-sdk client streaming the task from the gateway (``SendStreamingMessage``: card read
  once, then every status update and artifact chunk until ``completed``) vs the same client's
  blocking send (``SendMessage``, one JSON-RPC answer);
- ``--concurrency`` at once: tasks per second direct and through the gateway (streaming);
- a task submitted to a profile (one step, no planning call) vs the same goal planned.

    python bench/bench_a2a.py [--tasks 30] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import httpx
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.types import Message, Part, Role, SendMessageRequest, TaskState

from mesh_contracts.v1 import TaskPolicy
from mesh_testing.a2a_gateway import a2a_url, running_a2a
from mesh_testing.chaos import started
from mesh_testing.infra import running_infra
from meshctl.a2a import caller_token
from meshctl.cli import main as cli_main
from meshctl.client import TenantClient

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
CALC = '#call: calculator {"expression": "17 * 23"}'
NO_JUDGE = TaskPolicy(judge=False)


def pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def line(name: str, xs: list[float], base: list[float] | None = None) -> str:
    ratio = f"   ratio {statistics.median(xs) / statistics.median(base):.2f}x" if base else ""
    return f"  {name:<34} {statistics.median(xs) * 1000:7.1f} / {pct(xs, 0.95) * 1000:7.1f} ms{ratio}"


async def timed(n: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> tuple[list[float], float]:
    sem, out = asyncio.Semaphore(concurrency), []

    async def run(i: int) -> None:
        async with sem:
            t0 = time.perf_counter()
            await one(i)
            out.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(n)))
    return out, n / (time.perf_counter() - t0)


def direct(c: TenantClient, tag: str, goal: str = GOAL, **kw: object) -> Callable[[int], Awaitable[None]]:
    async def one(i: int) -> None:
        got = await c.submit(goal, task_id=f"d-{tag}-{i}", timeout=60, **kw)  # type: ignore[arg-type]
        assert got.outcome is not None and got.outcome.type == "task.completed", got.outcome

    return one


async def a2a_client(base: str, token: str) -> tuple[httpx.AsyncClient, object, object]:
    http = httpx.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=120.0)
    card = await A2ACardResolver(http, a2a_url(base, "acme", "mesh")).get_agent_card()
    streaming = ClientFactory(ClientConfig(httpx_client=http, streaming=True)).create(card)
    blocking = ClientFactory(ClientConfig(httpx_client=http, streaming=False)).create(card)
    return http, streaming, blocking


def through_a2a(client: object) -> Callable[[int], Awaitable[None]]:
    async def one(i: int) -> None:
        request = SendMessageRequest(
            message=Message(role=Role.ROLE_USER, message_id=uuid.uuid4().hex, parts=[Part(text=GOAL)])
        )
        last = None
        async for event in client.send_message(request):  # type: ignore[attr-defined]
            last = event
        state = last.status_update.status.state if last.HasField("status_update") else last.task.status.state
        assert state == TaskState.TASK_STATE_COMPLETED, last

    return one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    with running_infra(["acme"], name="bench-a2a") as infra, started(infra, {"MESH_LOG_LEVEL": "WARNING"}):
        home = ["--home", str(infra.home)]
        cli_main([*home, "authors", "add", "alice", "--tenant", "acme", "--nats-url", infra.nats_url])
        cli_main([*home, "agent", "add", "calc", "--description", "Exact sums", "--tool", "calculator",
                  "--as", "author.acme.alice", "--nats-url", infra.nats_url])  # fmt: skip
        with running_a2a(infra) as base:
            token = caller_token(infra.ids, "acme", "alice")

            async def run() -> None:
                http, streaming, blocking = await a2a_client(base, token)
                c = await infra.client("acme").__aenter__()
                try:
                    await timed(5, 1, direct(c, "warm"))
                    await timed(5, 1, through_a2a(streaming))
                    d1, _ = await timed(args.tasks, 1, direct(c, "seq"))
                    s1, _ = await timed(args.tasks, 1, through_a2a(streaming))
                    b1, _ = await timed(args.tasks, 1, through_a2a(blocking))
                    _, dt = await timed(args.tasks, args.concurrency, direct(c, "par"))
                    _, st = await timed(args.tasks, args.concurrency, through_a2a(streaming))
                    planned, _ = await timed(args.tasks, 1, direct(c, "calc-planned", f"PLAN: {plan()}",
                                                                  policy=NO_JUDGE))  # fmt: skip
                    profiled, _ = await timed(args.tasks, 1, direct(c, "calc-agent", CALC, policy=NO_JUDGE,
                                                                   agent="calc"))  # fmt: skip
                finally:
                    await http.aclose()
                    await c.__aexit__(None, None, None)
                print(f"A2A bench: {args.tasks} tasks one at a time, submit to outcome p50 / p95:")
                print(line("direct (TenantClient)", d1))
                print(line("A2A, streaming (a2a-sdk client)", s1, d1))
                print(line("A2A, blocking send", b1, d1))
                print(f"  {args.concurrency} at once: direct {dt:.1f} tasks/s, through the A2A gateway {st:.1f} tasks/s"
                      f"   ratio {st / dt:.2f}x")  # fmt: skip
                print(f"agent profile: one calculator step, {args.tasks} tasks one at a time, p50 / p95:")
                print(line("a one-step plan (PLAN: cue)", planned))
                print(line("submitted to profile calc", profiled, planned))

            asyncio.run(run())


def plan() -> str:
    import json

    return json.dumps({"steps": [{"step_id": "s1", "kind": "answer", "instruction": CALC, "tools": ["calculator"],
                                  "depends_on": []}]})  # fmt: skip


if __name__ == "__main__":
    main()
