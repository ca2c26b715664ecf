"""The mesh's sample task on Temporal: latency, throughput and CPU per task, as one JSON line.

Run with the peer venv's interpreter (``make bench-peers`` builds it; temporalio and the
``temporal`` CLI are never part of the product's dependencies):

    .venv-peers/bin/python bench/peers/temporal_bench.py [--tasks 30] [--concurrency 32] [--stock-server]

It starts ``temporal server start-dev`` on loopback with a durable sqlite file (the mesh's
nats-server runs with ``sync_interval: always``, so both sides persist every step), a worker in
its own process (so its CPU is counted apart from the client's), runs the workflow of
``agent_workflow.py`` (9 no-op activities, 6 on the critical path) ``--tasks`` times one after
the other, then ``2 * --concurrency`` at once, and prints on its last line:

    {"system": "temporal", "p50_ms": ..., "p99_ms": ..., "tasks_per_s": ..., "completed": ...,
     "in_flight": ..., "cpu_ms_per_task": {"temporal-server": ..., "worker": ..., "client": ...}}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path

from agent_workflow import ACTIVITIES, TASK_QUEUE, AgentTask
from temporalio.client import Client
from temporalio.worker import Worker

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
# Generous slots and pollers, so that the worker is never what holds Temporal back: 64 workflows
# in flight have at most 64 workflow tasks and 128 activities outstanding at once. Activities
# are async (see agent_workflow.py); eager activity dispatch is on (the SDK's and start-dev's
# default: an activity scheduled by a workflow task comes back with its completion, no poll).
WORKER_SETTINGS = {
    "max_concurrent_activities": 200,
    "max_concurrent_workflow_tasks": 100,
    "max_concurrent_workflow_task_polls": 10,
    "max_concurrent_activity_task_polls": 10,
}


# The server as a well-run deployment would set it up for this load, both settings documented:
# - sqlite in WAL mode with synchronous=FULL: still durable (every commit is fsynced, as the
#   mesh's nats-server is with sync_interval: always), without the rollback journal's extra writes;
# - the history service's transfer-queue reader allowed more than its default 20 reads a second:
#   at 20, every workflow or activity task waits up to 50 ms for the next read, which doubles a
#   sequential workflow's latency here. --stock-server measures start-dev's defaults instead.
SQLITE_PRAGMAS = ["journal_mode=wal", "synchronous=full"]
DYNAMIC_CONFIG = ["history.transferProcessorMaxPollRPS=1000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live descendants so far, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += ticks(p)
        except OSError:
            continue
        todo += children.get(p, [])
    return total / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def stop(proc: subprocess.Popen | None) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after 10 s."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def run_worker(address: str) -> None:
    # The default, sandboxed workflow runner: what Temporal recommends and ships (it guards the
    # workflow's determinism). UnsandboxedWorkflowRunner saves the worker about a quarter of its
    # CPU per task here; a deployment that gives up the guard for that is not the common one.
    client = await Client.connect(address)
    worker = Worker(client, task_queue=TASK_QUEUE, workflows=[AgentTask], activities=ACTIVITIES, **WORKER_SETTINGS)
    await worker.run()


async def connect(address: str, server: subprocess.Popen, deadline_s: float) -> Client:
    deadline = time.monotonic() + deadline_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"temporal server exited with {server.returncode}")
        try:
            return await Client.connect(address)
        except Exception:  # not listening yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def one(client: Client) -> float:
    t0 = time.perf_counter()
    result = await client.execute_workflow(
        AgentTask.run,
        GOAL,
        id=f"bench-{uuid.uuid4().hex}",
        task_queue=TASK_QUEUE,
        execution_timeout=timedelta(seconds=120),  # the mesh bench's own bound on one task
    )
    assert result["verdict"] == "pass", result
    return time.perf_counter() - t0


def start_server(temporal: str, tmp: Path, port: int, stock: bool) -> subprocess.Popen:
    tuning = (
        [] if stock else [*flags("--sqlite-pragma", SQLITE_PRAGMAS), *flags("--dynamic-config-value", DYNAMIC_CONFIG)]
    )
    return subprocess.Popen(
        [
            temporal,
            "server",
            "start-dev",
            "--db-filename",
            str(tmp / "t.db"),
            "--ip",
            "127.0.0.1",
            "--port",
            str(port),
            "--headless",
            "--log-level",
            "warn",
            *tuning,
        ],
        stdin=subprocess.DEVNULL,
        stdout=(tmp / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_worker(address: str, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, "--worker", "--address", address],
        stdin=subprocess.DEVNULL,
        stdout=(tmp / "worker.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def flags(flag: str, values: list[str]) -> list[str]:
    return [x for v in values for x in (flag, v)]


def failure(tmp: Path) -> str:
    """The first lines of a panic in the server's log (else its tail), and the worker's tail."""
    try:
        lines = (tmp / "server.log").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    at = next((i for i, line in enumerate(lines) if line.startswith(("panic", "fatal"))), None)
    server = "\n".join(lines[at : at + 8] if at is not None else lines[-8:])
    return f"--- server log ---\n{server}\n--- worker log ---\n{tail(tmp / 'worker.log')}"


async def up(temporal: str, tmp: Path, stock: bool) -> tuple[subprocess.Popen, subprocess.Popen, Client]:
    """Server, worker, and a client that has run one workflow through them (the warm-up)."""
    tmp.mkdir()
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = start_server(temporal, tmp, port, stock)
    worker = None
    try:
        client = await connect(address, server, 60)
        worker = start_worker(address, tmp)
        await asyncio.wait_for(one(client), 60)  # warm-up: the namespace, the worker's pollers, caches
    except BaseException:
        stop(worker)
        stop(server)
        raise
    return server, worker, client


async def bench(tasks: int, concurrency: int, temporal: str, stock: bool) -> dict:
    server = worker = None
    tmp = Path(tempfile.mkdtemp(prefix="agentmesh-temporal-"))
    try:
        for attempt in (1, 2):  # the dev server has been seen to panic once at start-up, rarely
            try:
                server, worker, client = await up(temporal, tmp / str(attempt), stock)
                break
            except Exception as e:
                if attempt == 2:
                    raise RuntimeError(f"temporal did not come up: {e!r}\n{failure(tmp / str(attempt))}") from e
                print(f"temporal did not come up ({e!r}); once more\n{failure(tmp / str(attempt))}", file=sys.stderr)
        seq = [await one(client) for _ in range(tasks)]
        pids = {"temporal-server": server.pid, "worker": worker.pid}
        cpu0 = {k: tree_cpu_s(p) for k, p in pids.items()} | {"client": time.process_time()}
        t1 = time.perf_counter()
        runs = await asyncio.gather(*(one(client) for _ in range(concurrency * 2)), return_exceptions=True)
        wall = time.perf_counter() - t1
        cpu1 = {k: tree_cpu_s(p) for k, p in pids.items()} | {"client": time.process_time()}
        if worker.poll() is not None or server.poll() is not None:
            raise RuntimeError(f"the temporal server or worker died during the run\n{failure(tmp / str(attempt))}")
    finally:
        stop(worker)
        stop(server)
        shutil.rmtree(tmp, ignore_errors=True)
    ok = sum(isinstance(r, float) for r in runs)
    return {
        "system": "temporal",
        "p50_ms": statistics.median(seq) * 1000,
        "p99_ms": pct(seq, 0.99) * 1000,
        "tasks": tasks,
        "in_flight": len(runs),
        "completed": ok,
        "tasks_per_s": ok / wall,
        "cpu_ms_per_task": {k: (cpu1[k] - cpu0[k]) * 1000 / len(runs) for k in cpu1},
        "worker_settings": WORKER_SETTINGS,
        "server_settings": {} if stock else {"sqlite_pragmas": SQLITE_PRAGMAS, "dynamic_config": DYNAMIC_CONFIG},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=30, help="sequential tasks for p50/p99")
    ap.add_argument("--concurrency", type=int, default=32, help="2x this many workflows in flight at once")
    ap.add_argument("--temporal", default=str(Path(sys.executable).parent / "temporal"), help="the temporal CLI")
    ap.add_argument(
        "--stock-server",
        action="store_true",
        help="start-dev's own defaults: rollback-journal sqlite, transfer queue read at most 20 times a second",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--address", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        asyncio.run(run_worker(a.address))
        return
    if not (shutil.which(a.temporal) or Path(a.temporal).is_file()):
        sys.exit(f"temporal CLI not found at {a.temporal} (pip install -r bench/peers/requirements.txt)")
    try:
        result = asyncio.run(bench(a.tasks, a.concurrency, a.temporal, a.stock_server))
    except Exception as e:  # noqa: BLE001 -- whatever it is, the caller gets one line (the traceback above it)
        traceback.print_exc()
        sys.exit(f"error: {(str(e) or type(e).__name__).splitlines()[0]}")  # the one line a caller shows
    print(json.dumps(result))


if __name__ == "__main__":
    main()
