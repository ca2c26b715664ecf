"""The mesh and Temporal side by side on the same work, as one table (``make bench-peers``).

- mesh: bench/bench_task.py's sample task through a local mesh (six services, nats-server with
  ``sync_interval: always``, redis-server), imported and run in this process;
- temporal: the same shape of work as a workflow (plan, two parallel model -> tool/retrieve ->
  model branches, answer, judge: 9 activities with no-op bodies, 6 on the critical path) on
  ``temporal server start-dev`` with a durable sqlite file, a worker in its own process;
  bench/peers/temporal_bench.py, run by the peer's own venv (``.venv-peers``) so that
  temporalio never enters the product's dependencies.

The two run one after the other, never together (the machine has two cores). Both measure
sequential latency over ``--tasks`` tasks, then throughput and CPU per task with
``2 * --concurrency`` tasks in flight. With ``--rounds N`` each side runs N times, in turns
(mesh, temporal, temporal, mesh, ...), and the table holds the medians: a shared machine's speed
drifts by more than a single pair can tell. It exits 0 whatever the numbers (a benchmark, not a
test) and non-zero, with one line saying why, when a side fails to run.

Like for like, the mesh's clients here wait for the outcome alone (``progress=False``), as
Temporal's do (``make bench`` measures a client that follows every progress event too).

    python bench/bench_peers.py [--tasks 30] [--concurrency 32] [--rounds 1] [--writes-tasks 10] [--stock-server]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_task
import bench_writes

ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = ROOT / "bench" / "peers" / "temporal_bench.py"
THROUGHPUT_TARGET = 3.0  # mesh tasks/s >= 3x Temporal's on the same machine
P50_TARGET = 0.5  # mesh sequential p50 <= 0.5x Temporal's
CPU_TARGET_MS = 50.0  # mesh CPU per task, all processes
WRITES_TARGET = 25.0  # synced stored writes per sample task (bench_writes)


class SideFailed(Exception):
    pass


def run_mesh(tasks: int, concurrency: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-peers-"))
    try:
        # Like for like: the clients wait for the outcome alone, as Temporal's do.
        return asyncio.run(bench_task.measure(tasks, concurrency, baseline=False, home=home, progress=False))
    except Exception as e:
        raise SideFailed(f"mesh side failed: {type(e).__name__}: {e}".splitlines()[0]) from e
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run_temporal(python: Path, tasks: int, concurrency: int, stock: bool) -> dict:
    if not python.exists():
        raise SideFailed(f"temporal side failed: no {python} (make bench-peers creates it)")
    cmd = [str(python), str(PEER_SCRIPT), "--tasks", str(tasks), "--concurrency", str(concurrency)]
    try:
        p = subprocess.run(
            [*cmd, *(["--stock-server"] if stock else [])], capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise SideFailed("temporal side failed: no result within 15 minutes") from e
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        log = ROOT / ".bench" / "temporal_bench.stderr"
        log.parent.mkdir(exist_ok=True)
        log.write_text(p.stderr)
        last = next((ln.strip() for ln in reversed(p.stderr.splitlines()) if ln.strip()), "no output")
        raise SideFailed(
            f"temporal side failed (exit {p.returncode}): {last.removeprefix('error: ')} (full log: .bench/{log.name})"
        )
    try:
        return json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise SideFailed(f"temporal side failed: its last line is not JSON: {lines[-1][:120]}") from e


def median(runs: list[dict]) -> dict:
    """One side's runs folded into one: the median of every number (per process for CPU)."""
    if len(runs) == 1:
        return runs[0]
    out = dict(runs[-1])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in runs)
        elif isinstance(v, dict) and v and all(isinstance(x, (int, float)) for x in v.values()):
            out[k] = {name: statistics.median(r[k].get(name, 0.0) for r in runs) for name in v}
    out["rounds"] = len(runs)
    return out


def table(mesh: dict, peer: dict) -> str:
    """One row per measure: mesh, temporal, mesh/temporal, and which way is better."""
    rows: list[tuple[str, str, str, str, str]] = []

    def row(name: str, m: float | None, t: float | None, better: str, fmt: str = "{:.1f}") -> None:
        ratio = f"{m / t:.2f}x" if m is not None and t else ""
        if m is not None and t is not None and better in ("lower", "higher"):
            mesh_wins = m < t if better == "lower" else m > t
            better = f"{better}: {'mesh' if mesh_wins else 'temporal'}" if m != t else f"{better}: even"
        rows.append(
            (name, fmt.format(m) if m is not None else "-", fmt.format(t) if t is not None else "-", ratio, better)
        )

    mcpu, tcpu = mesh["cpu_ms_per_task"], peer["cpu_ms_per_task"]
    mserver = {k: v for k, v in mcpu.items() if k != "client"}
    tserver = {k: v for k, v in tcpu.items() if k != "client"}
    row(f"sequential p50, {mesh['tasks']} tasks (ms)", mesh["p50_ms"], peer["p50_ms"], "lower")
    row("sequential p99 (ms)", mesh["p99_ms"], peer["p99_ms"], "lower")
    row(f"throughput, {mesh['in_flight']} in flight (tasks/s)", mesh["tasks_per_s"], peer["tasks_per_s"], "higher")
    rows.append(
        ("  completed", f"{mesh['completed']}/{mesh['in_flight']}", f"{peer['completed']}/{peer['in_flight']}", "", "")
    )
    row("CPU per task, server side (ms)", sum(mserver.values()), sum(tserver.values()), "lower")
    for k, v in sorted(mserver.items(), key=lambda kv: -kv[1]):
        row(f"  {k} (mesh)", v, None, "lower")
    for k, v in sorted(tserver.items(), key=lambda kv: -kv[1]):
        row(f"  {k} (temporal)", None, v, "lower")
    row("CPU per task, client waiting for the outcome (ms)", mcpu["client"], tcpu["client"], "lower")
    row("CPU per task, all processes (ms)", sum(mcpu.values()), sum(tcpu.values()), "lower")

    head = ("", "mesh", "temporal", "mesh/temporal", "better")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]

    def line(cells: tuple[str, ...]) -> str:
        name, *nums, better = cells
        return "  ".join([name.ljust(widths[0]), *(c.rjust(w) for c, w in zip(nums, widths[1:4], strict=True)), better])

    out = [line(head), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)]
    return "\n".join(s.rstrip() for s in out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=30, help="sequential tasks for p50/p99, each side")
    ap.add_argument("--concurrency", type=int, default=32, help="2x this many tasks in flight for throughput and CPU")
    ap.add_argument("--peer-python", type=Path, default=ROOT / ".venv-peers" / "bin" / "python")
    ap.add_argument("--stock-server", action="store_true", help="Temporal's start-dev defaults, untuned")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each side, in turns; the table holds medians")
    ap.add_argument("--writes-tasks", type=int, default=10,
                    help="sample tasks to count synced writes over (bench_writes; 0: skip)")  # fmt: skip
    a = ap.parse_args()
    if a.rounds < 1 or a.tasks < 1 or a.concurrency < 1 or a.writes_tasks < 0:
        ap.error("--rounds, --tasks and --concurrency must be at least 1, --writes-tasks 0 or more")
    meshes: list[dict] = []
    peers: list[dict] = []
    try:
        for i in range(a.rounds):
            for side in ("mesh", "temporal") if i % 2 == 0 else ("temporal", "mesh"):
                print(f"round {i + 1}/{a.rounds}: {side}, {a.tasks} sequential tasks, then {2 * a.concurrency} "
                      "in flight ...", file=sys.stderr, flush=True)  # fmt: skip
                if side == "mesh":
                    meshes.append(run_mesh(a.tasks, a.concurrency))
                else:
                    peers.append(run_temporal(a.peer_python.absolute(), a.tasks, a.concurrency, a.stock_server))
    except SideFailed as e:
        print(f"bench-peers: {e}", file=sys.stderr)
        return 1
    mesh, peer = median(meshes), median(peers)
    settings = peer.get("server_settings") or {}
    print("mesh: the README's sample task, six services + nats-server (sync always) + redis-server")
    print(
        "temporal: the same shape as a workflow, 9 no-op async activities (6 on the critical path), "
        "start-dev with a durable sqlite file, worker in its own process"
    )
    print(f"  server: {json.dumps(settings) if settings else 'start-dev defaults'}")
    print(f"  worker: {json.dumps(peer.get('worker_settings', {}))}")
    if a.rounds > 1:
        print(f"  {a.rounds} rounds each, in turns; medians")
    print()
    print(table(mesh, peer))
    print()
    mserver = sum(v for k, v in mesh["cpu_ms_per_task"].items() if k != "client")
    tserver = sum(v for k, v in peer["cpu_ms_per_task"].items() if k != "client")
    print(f"CPU per task, server side, mesh/temporal: {mserver / tserver:.2f}x (below 1x: the mesh spends less)")
    writes = None
    if a.writes_tasks:
        print(
            f"writes: {a.writes_tasks} sample tasks one after another in a fresh mesh ...", file=sys.stderr, flush=True
        )
        writes = asyncio.run(bench_writes.measure(a.writes_tasks))["synced"]
    print()
    print(targets(mesh, peer, writes))
    return 0


def targets(mesh: dict, peer: dict, writes: float | None) -> str:
    """Issue 39's targets, each with the measured figure and met / not met."""
    throughput = mesh["tasks_per_s"] / peer["tasks_per_s"] if peer["tasks_per_s"] else float("inf")
    p50 = mesh["p50_ms"] / peer["p50_ms"] if peer["p50_ms"] else float("inf")
    cpu = sum(mesh["cpu_ms_per_task"].values())
    rows = [
        (
            "throughput mesh/temporal",
            f"{throughput:.2f}x",
            f">= {THROUGHPUT_TARGET:g}x",
            throughput >= THROUGHPUT_TARGET,
        ),
        ("sequential p50 mesh/temporal", f"{p50:.2f}x", f"<= {P50_TARGET:g}x", p50 <= P50_TARGET),
        ("CPU per task, all processes", f"{cpu:.1f} ms", f"<= {CPU_TARGET_MS:g} ms", cpu <= CPU_TARGET_MS),
    ]
    if writes is not None:
        rows.append(
            ("synced writes per sample task", f"{writes:.1f}", f"<= {WRITES_TARGET:g}", writes <= WRITES_TARGET)
        )
    lines = ["targets:"]
    lines += [f"  {name:<32} {got:>9}  target {want:<9} {'met' if ok else 'not met'}" for name, got, want, ok in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
