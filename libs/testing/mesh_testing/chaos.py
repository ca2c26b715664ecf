"""A chaos harness: the mesh's services as processes that the harness owns and may kill.

It only ever signals a process it started, checked by pid *and* kernel start time, so a
recycled pid is never hit. A supervisor restarts dead services (as Kubernetes would).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx

from mesh_contracts import SERVICES
from mesh_contracts.v1.records import TaskRecord
from mesh_testing.errors import TestingError
from mesh_testing.infra import Infra
from meshctl import local

ADMIT_ALL = {"MESH_ADMISSION_MAX_IN_FLIGHT": "1000000", "MESH_ADMISSION_BURST": "1000000"}
"""Under every chaos mesh unless a test sets them: the suite puts its sizes (500 tasks at once from
one tenant with ``MESH_CHAOS=full``) through crashes to show nothing is lost or repeated, and the
planner's default admission (100 in flight, bursts of 200) would refuse most of them before any
fault is met. Admission under load has its own scenarios (tests/scenarios/test_admission.py)."""


class NotOurProcess(RuntimeError, TestingError):
    """Refusal to signal a pid the harness did not start (or that was recycled)."""


@dataclass
class ChaosMesh:
    infra: Infra
    env: dict[str, str] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)
    procs: dict[str, tuple[str, local.Proc]] = field(default_factory=dict)  # name -> (service, proc)
    kills: list[tuple[float, str]] = field(default_factory=list)  # (wall-clock time, name)
    restarts: Counter[str] = field(default_factory=Counter)
    _supervisor: asyncio.Task[None] | None = None
    _extra: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> its own environment

    def start(self, per_service_env: dict[str, dict[str, str]] | None = None) -> None:
        for svc in SERVICES:
            for i in range(self.replicas.get(svc, 1)):
                self._spawn(svc, f"{svc}-{i}", (per_service_env or {}).get(svc, {}))

    def _spawn(self, svc: str, name: str, extra: dict[str, str] | None = None) -> None:
        extra = self._extra.setdefault(name, extra or {})  # a replacement runs as the one it replaces
        proc = local.start_service(
            self.infra.ids, self.infra.nats_url, svc, name=name, extra_env={**ADMIT_ALL, **self.env, **extra}
        )
        self.procs[name] = (svc, proc)

    async def add(self, svc: str, name: str, timeout: float = 30, env: dict[str, str] | None = None) -> None:
        """Start one more process of ``svc`` (a scale-up; ``env`` for it alone) and wait until it is ready."""
        self._spawn(svc, name, env)
        await local.wait_ready({name: self.procs[name][1]}, timeout)

    async def add_pool_worker(self, pool: str, name: str, timeout: float = 30) -> None:
        """Start a worker of ``pool`` (issue 48): its own identity (``worker-<pool>``), its durables."""
        from meshctl.pools import pool_identity

        await self.add("worker", name, timeout, pool_identity(self.infra.ids, pool))

    async def replace(self, name: str, timeout: float = 30) -> None:
        """Reap ``name`` (killed by the test) and start a fresh process under the same name."""
        svc, proc = self.procs.pop(name)
        local.stop([[proc]], 1.0)
        await self.add(svc, name, timeout)

    async def ready(self, timeout: float = 60) -> None:
        await local.wait_ready({n: p for n, (_, p) in self.procs.items()}, timeout)

    def names(self, service: str) -> list[str]:
        return [n for n, (s, _) in self.procs.items() if s == service]

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        _, proc = self.procs[name]
        if not proc.alive():  # checks the start time too: never a recycled pid
            raise NotOurProcess(f"{name} (pid {proc.pid}) is not a live process this harness started")
        os.kill(proc.pid, sig)
        self.kills.append((time.time(), name))

    def supervise(self, delay_s: float = 0.3) -> None:
        """Restart any dead service process after ``delay_s`` (a pod restart)."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(0.1)
                for name, (svc, proc) in list(self.procs.items()):
                    if not proc.alive():
                        local.stop([[proc]], 1.0)  # reap it
                        await asyncio.sleep(delay_s)
                        self._spawn(svc, name)
                        self.restarts[name] += 1

        self._supervisor = asyncio.create_task(loop())

    async def chaos_monkey(self, service: str, interval_s: tuple[float, float], min_kills: int,
                           done: asyncio.Event) -> None:  # fmt: skip
        """kill -9 a random replica of ``service`` every ``interval_s`` until ``done`` (and at least
        ``min_kills`` times)."""
        while not (done.is_set() and len(self.kills) >= min_kills):
            await asyncio.sleep(random.uniform(*interval_s))
            live = [n for n in self.names(service) if self.procs[n][1].alive()]
            if live:
                self.kill(random.choice(live))

    async def counters(self, name: str) -> dict[str, int]:
        """The ``/status`` counters of one running process (e.g. ``planner-0``)."""
        async with httpx.AsyncClient(timeout=2) as http:
            status = await http.get(f"http://127.0.0.1:{self.procs[name][1].http_port}/status")
            counters: dict[str, int] = status.json()["counters"]
            return counters

    async def stop(self) -> None:
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        local.stop([[p for _, p in self.procs.values()]], 20.0)


@contextlib.contextmanager
def started(infra: Infra, env: dict[str, str]) -> Iterator[ChaosMesh]:
    """A scenario module's mesh: every service started on ``infra`` with ``env`` and ready;
    stopped on the way out, also when it never became ready (no process left behind)."""
    mesh = ChaosMesh(infra, env=env)
    mesh.start()
    try:
        asyncio.run(mesh.ready())
        yield mesh
    finally:
        asyncio.run(mesh.stop())


async def outbox_effects(infra: Infra, tenant: str) -> Counter[str]:
    """Stored emails per task: the observed external effects."""
    nc = await infra.admin()
    try:
        js = nc.jetstream()
        info = await js.stream_info("OUTBOX", subjects_filter=f"outbox.{tenant}.>")
        return Counter({subj.split(".")[2]: n for subj, n in (info.state.subjects or {}).items()})
    finally:
        await nc.close()


async def failed_calls(infra: Infra, tenant: str, tasks: list[str]) -> list[tuple[str, str, str]]:
    """(task, tool, error) of each tool call of ``tasks`` the tool-executor answered with a
    failure: what a drill's "missing effect" looks like from the step's side."""
    from mesh_contracts.v1 import ToolCompleted

    wanted, out = set(tasks), []
    for m in await infra.stored("TOOL", f"tool.*.{tenant}.*.completed"):
        answer = cast(ToolCompleted, ToolCompleted.parse(m.data or b"{}"))
        if answer.task_id in wanted and not answer.ok:
            out.append((answer.task_id, answer.tool, answer.error))
    return out


async def stored_per_task(infra: Infra, tenant: str, tasks: list[str]) -> dict[str, dict[str, int]]:
    """Stored step completions, tool requests and outcomes per task: a duplicate would show here."""
    nc = await infra.admin()
    try:
        js = nc.jetstream()
        out = {}
        for t in tasks:
            steps = await js.stream_info("STEP", subjects_filter=f"step.v1.{tenant}.{t}.completed")
            tools = await js.stream_info("TOOL", subjects_filter=f"tool.v1.{tenant}.{t}.requested")
            done = await js.stream_info("TASK", subjects_filter=f"task.v1.{tenant}.{t}.completed")
            out[t] = {
                "step.completed": sum((steps.state.subjects or {}).values()),
                "tool.requested": sum((tools.state.subjects or {}).values()),
                "task.completed": sum((done.state.subjects or {}).values()),
            }
        return out
    finally:
        await nc.close()


async def where_stuck(infra: Infra, tenant: str, tasks: list[str]) -> dict[str, str]:
    """Each task's stored progress, for a test that lost it: the record's status, each step's
    status and attempt, and what its outbox still holds ("no record": the planner never admitted
    its submission); then the messages of it each work stream stores (a step requested and never
    answered, a tool asked and never answered), and each durable's messages delivered and not yet
    acknowledged (a handler that held one)."""
    nc = await infra.admin()
    try:
        js = nc.jetstream()
        kv = await js.key_value("tasks")
        out = {}
        for t in tasks:
            try:
                entry = await kv.get(TaskRecord.key(tenant, t))
            except Exception:  # noqa: BLE001 - no such key (or the bucket unreachable): say so
                out[t] = "no record"
                continue
            rec = TaskRecord.from_bytes(entry.value or b"{}", TaskRecord.key(tenant, t))
            steps = ", ".join(f"{k}:{s.status}#{s.attempt}" for k, s in rec.steps.items())
            outbox = ", ".join(i.type for i in rec.outbox)
            out[t] = f"{rec.status} ({rec.reason}) steps [{steps}] outbox [{outbox}] check #{rec.check_attempt}"
            for stream, prefix in (("STEP", "step"), ("TOOL", "tool"), ("RAG", "rag")):
                with contextlib.suppress(Exception):  # a diagnosis: say what can be read
                    info = await js.stream_info(stream, subjects_filter=f"{prefix}.v1.{tenant}.{t}.>")
                    subjects = info.state.subjects or {}
                    out[t] += f"; {stream} " + ", ".join(
                        f"{k.split('.', 4)[-1]} x{n}" for k, n in sorted(subjects.items())
                    )
        with contextlib.suppress(Exception):
            pending = []
            for stream in ("STEP", "TOOL", "RAG"):
                for c in await js.consumers_info(stream):
                    if c.num_ack_pending or c.num_pending:
                        pending.append(f"{stream}/{c.name}: {c.num_ack_pending} unacked, {c.num_pending} waiting, "
                                       f"{c.num_redelivered} redelivered")  # fmt: skip
            out["durables"] = "; ".join(pending) or "every durable caught up"
        return out
    finally:
        await nc.close()


def recovery_s(faults: list[float], completions: list[float]) -> list[float]:
    """Per fault, seconds until the next task completed after it: how long the mesh stopped
    making progress (wall-clock times)."""
    done = sorted(completions)
    out = []
    for f in faults:
        after = next((c for c in done if c > f), None)
        if after is not None:
            out.append(after - f)
    return out


async def latencies(
    client: Any, goal: str, n: int, *, warm: bool = False, while_: Callable[[], bool] | None = None,
    timeout: float = 60.0, ids: list[str] | None = None,
) -> list[float]:  # fmt: skip
    """How long each of ``n`` tasks took, run one after another by ``client`` (a ``TenantClient``)
    waiting for the outcome alone; fewer once ``while_()`` is false (a burst drained). Every one
    must complete. ``warm``: one more first, not counted. ``ids`` collects the counted tasks' ids."""
    from mesh_contracts.v1 import TaskCompleted

    if warm:
        await client.submit(goal, progress=False, timeout=timeout)
    out: list[float] = []
    while len(out) < n and (while_ is None or while_()):
        seen = await client.submit(goal, progress=False, timeout=timeout)
        assert isinstance(seen.outcome, TaskCompleted), seen.outcome
        out.append(seen.latency_s)
        if ids is not None:
            ids.append(seen.task_id)
    return out


@dataclass(frozen=True)
class Stage:
    """One service's turn in a task, as the mesh stores it: what arrives for it (``arrive``, on
    ``stream``) and what shows it was taken up (``taken``, on ``taken_stream``: its output, or the
    progress event it emits when it takes the message). Subject patterns of ``<tenant>``/``<task>``."""

    name: str
    stream: str
    arrive: str
    taken_stream: str
    taken: str


PLANNER = Stage("planner", "TASK", "task.*.{tenant}.{task}.submitted", "TASK", "task.*.{tenant}.{task}.planned")
WORKER = Stage("worker", "STEP", "step.*.{tenant}.{task}.requested", "EVENTS", "event.*.{tenant}.{task}.progress")


async def overtaken(infra: Infra, stage: Stage, tenant: str, tasks: list[str], other: str) -> list[int]:
    """For each of ``tenant``'s ``tasks``: how many of ``other``'s messages ``stage`` took up after
    the task's first message arrived there and before it took that one up, in the order the broker
    stored them (its clock, one server: an order of events, not a duration). A fair scheduler keeps
    this within its design (a turn each); one that serves in stored order makes a task wait behind
    the whole of another tenant's backlog. For the worker, "taken up" is its ``step.started`` event."""

    async def stamped(stream: str, pattern: str) -> list[tuple[float, str, bytes]]:
        out = []
        for m in await infra.stored(stream, pattern.format(tenant="*", task="*")):
            out.append((m.metadata.timestamp.timestamp(), m.subject, m.data or b""))
        return out

    def task_of(subject: str) -> tuple[str, str]:
        parts = subject.split(".")
        return parts[2], parts[3]

    def is_taken(data: bytes) -> bool:
        if stage.taken_stream != "EVENTS":
            return True
        try:
            seen: object = json.loads(data).get("stage")
            return seen == "step.started"
        except ValueError:
            return False

    arrived = [(at, *task_of(subj)) for at, subj, _ in await stamped(stage.stream, stage.arrive)]
    taken = [
        (at, *task_of(subj)) for at, subj, data in await stamped(stage.taken_stream, stage.taken) if is_taken(data)
    ]
    counts = []
    for task in tasks:
        came = min((at for at, t, k in arrived if (t, k) == (tenant, task)), default=None)
        took = min((at for at, t, k in taken if (t, k) == (tenant, task)), default=None)
        if came is None or took is None:
            raise AssertionError(f"{stage.name}: no record of {tenant}/{task} arriving and being taken up")
        counts.append(sum(1 for at, t, _ in taken if t == other and came < at < took))
    return counts


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank), rounded for reports; 0.0 for no values."""
    values = sorted(values)
    return round(values[min(len(values) - 1, round(q * (len(values) - 1)))], 3) if values else 0.0


def report(scenario: str, **facts: object) -> None:
    """One line per scenario, printed and (with MESH_CHAOS_REPORT set) appended as JSON."""
    line = json.dumps({"scenario": scenario, **facts})
    print(f"\nCHAOS {line}")
    if out := os.environ.get("MESH_CHAOS_REPORT"):
        with open(out, "a") as f:
            f.write(line + "\n")


def admin_mcp_config(directory: Path, settings: dict[str, dict[str, str]]) -> tuple[Path, Path]:
    """A tool-executor MCP config mounting the example admin server (read ``get_setting``, write
    ``set_setting``) with its state seeded from ``settings``; returns (config, state file)."""
    state = directory / "settings.json"
    state.write_text(json.dumps(settings))
    config = directory / "mcp.json"
    server = {
        "name": "admin",
        "command": sys.executable,
        "args": ["-m", "mesh_tool_executor.mcp_servers.admin"],
        "env": {"MESH_ADMIN_STATE": str(state)},
        "tools": {"get_setting": {"risk": "read"}, "set_setting": {"risk": "write"}},
    }
    config.write_text(json.dumps({"servers": [server]}))
    return config, state
