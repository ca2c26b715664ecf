"""A soak: ``--tasks`` sample tasks at a steady rate through one local mesh, with every process's
memory and the task latency watched window by window. What it shows: memory that stays flat once
warm (no per-task state kept for good) and a p99 that does not drift as the streams and buckets
grow.

Open loop: task *i* is submitted at ``start + i / rate`` whatever the earlier ones are doing
(at most ``--max-in-flight`` at once; a submission that would pass it waits and is counted
late). The rate must be one the mesh keeps up with, or the soak measures a queue (the default, 8
a second, is about 60% of what a two-core machine completes). Every ``--window-s`` it samples each process's resident memory (``VmRSS``) and the
latencies of the tasks that ended in the window. The summary compares the first warm window
(after ``--warmup`` of the tasks) with the last: memory growth per process, in MB and per
thousand tasks, and p50 / p99 drift. A benchmark, not a test: it exits 0 whatever the numbers,
and non-zero with one line when the mesh cannot run the tasks.

One tenant runs every task, so by default it may hold all of each stream (``--quota-share 1``,
``MESH_QUOTA_SHARE`` for the mesh's services): at the mesh's default share (an eighth) one tenant
is refused at the door after about 3,500 sample tasks in a stream's 7 days (README, "Tenant
quotas", sizing), and the soak would measure refusals.

    python bench/bench_soak.py [--tasks 10000] [--rate 8] [--window-s 30] [--warmup 0.2] [--quota-share 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_task import GOAL, pct, processes

from mesh_contracts.v1 import TaskCompleted, TaskFailed, TaskRejected
from meshctl import local
from meshctl.client import TenantClient


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


class Window:
    def __init__(self, at: float, submitted: int) -> None:
        self.at, self.submitted = at, submitted
        self.latencies: list[float] = []
        self.rss: dict[str, float] = {}


async def soak(tasks: int, rate: float, window_s: float, max_in_flight: int) -> dict:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-soak-"))
    state = await local.up(home, tenants=["soak"], nats_port=0, http_port=0, redis_port=0)
    ids = local.Identities(home)
    pids = processes(state)
    windows: list[Window] = []
    gate = asyncio.Semaphore(max_in_flight)
    late = 0
    outcomes: dict[str, int] = {}
    submitted = 0
    try:
        async with TenantClient.of(ids, state.nats_url, "soak") as c:
            await c.submit(GOAL, timeout=60)  # warm-up

            async def one() -> None:
                try:
                    seen = await c.submit(GOAL, timeout=300, progress=False)
                finally:
                    gate.release()
                kind = type(seen.outcome).__name__ if seen.outcome is not None else "timed out"
                if isinstance(seen.outcome, TaskRejected | TaskFailed):
                    kind += f" ({seen.outcome.code or seen.outcome.reason[:60]})"
                outcomes[kind] = outcomes.get(kind, 0) + 1
                if isinstance(seen.outcome, TaskCompleted):
                    windows[-1].latencies.append(seen.latency_s)

            start = time.monotonic()
            windows.append(Window(0.0, 0))

            def close() -> None:  # memory now, latencies as the window's tasks ended
                windows[-1].rss = {k: rss_mb(pid) for k, pid in pids.items()}
                windows.append(Window(time.monotonic() - start, submitted))

            async def sample() -> None:
                while True:
                    await asyncio.sleep(window_s)
                    close()

            sampler = asyncio.create_task(sample())
            running: set[asyncio.Task[None]] = set()
            for i in range(tasks):
                due = start + i / rate
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                if gate.locked():
                    late += 1
                await gate.acquire()
                t = asyncio.create_task(one())
                running.add(t)
                t.add_done_callback(running.discard)
                submitted += 1
            while running:
                await asyncio.sleep(0.2)
            sampler.cancel()
            close()
            windows.pop()  # the empty one just opened
            wall = time.monotonic() - start
        kept = await budget_kept(state)
    finally:
        local.down(home)
    return {"windows": windows, "late": late, "outcomes": outcomes, "wall_s": wall, "tasks": tasks, "rate": rate,
            "kept": kept}  # fmt: skip


async def budget_kept(state: local.MeshState) -> dict[str, int]:
    """The tasks each budget replica holds in memory at the end (its ``/status`` ``kept``): what
    its resident memory is made of, each bounded."""
    out: dict[str, int] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        for name, p in state.services.items():
            if name.startswith("budget") and p.http_port:
                try:
                    out |= {
                        f"{name} {k}": v
                        for k, v in (await http.get(f"http://127.0.0.1:{p.http_port}/status")).json()["kept"].items()
                    }
                except (httpx.HTTPError, KeyError, ValueError):
                    continue
    return out


def report(r: dict, warmup: float) -> str:
    windows: list[Window] = [w for w in r["windows"] if w.rss]
    tasks = r["tasks"]
    lines = [
        f"soak: {tasks} sample tasks at {r['rate']:g}/s in {r['wall_s']:.0f} s, quota share "
        f"{os.environ.get('MESH_QUOTA_SHARE', 'default')}; outcomes {r['outcomes']}; "
        f"{r['late']} submissions waited for a slot (--max-in-flight)",
        "",
        f"{'window':>8} {'tasks':>6} {'p50 ms':>7} {'p99 ms':>7}  resident MB per process",
    ]
    names = sorted(windows[0].rss) if windows else []
    lines.append(f"{'':>8} {'':>6} {'':>7} {'':>7}  " + " ".join(f"{n[:10]:>10}" for n in names))
    step = max(1, len(windows) // 12)
    for w in windows[::step] + ([windows[-1]] if (len(windows) - 1) % step else []):
        lat = w.latencies
        p50 = f"{statistics.median(lat) * 1000:7.0f}" if lat else f"{'-':>7}"
        p99 = f"{pct(lat, 0.99) * 1000:7.0f}" if lat else f"{'-':>7}"
        lines.append(f"{w.at:7.0f}s {len(lat):6d} {p50} {p99}  " + " ".join(f"{w.rss.get(n, 0):10.1f}" for n in names))
    warm = [w for w in windows if w.submitted >= warmup * tasks and w.latencies]
    if len(warm) >= 2:
        first, last = warm[0], warm[-1]
        done = sum(len(w.latencies) for w in warm[1:])
        lines += ["", f"from the first warm window ({first.at:.0f} s) to the last ({last.at:.0f} s), {done} tasks:"]
        # The second half alone as well: the first warm windows still fill every bounded cache
        # (and a resident figure keeps a cache's peak), so flat memory shows there if anywhere.
        half = len(warm) // 2
        mid = warm[half]
        done_late = sum(len(w.latencies) for w in warm[half + 1 :])
        for n in names:
            grew = last.rss[n] - first.rss[n]
            per_k = grew / done * 1000 if done else 0.0
            late_k = (last.rss[n] - mid.rss[n]) / done_late * 1000 if done_late else 0.0
            pct_grew = grew / first.rss[n] * 100 if first.rss[n] else 0.0
            lines.append(
                f"  {n:<14} {first.rss[n]:7.1f} -> {last.rss[n]:7.1f} MB ({pct_grew:+5.1f}%, {per_k:+.2f} MB per 1,000 "
                f"tasks; {late_k:+.2f} per 1,000 in the second half, from {mid.at:.0f} s)"
            )
        early = [x for w in warm[:half] for x in w.latencies]
        later = [x for w in warm[half:] for x in w.latencies]
        if early and later:
            lines.append(
                f"  latency first half vs second half of the warm windows: p50 {statistics.median(early) * 1000:.0f} -> "
                f"{statistics.median(later) * 1000:.0f} ms, p99 {pct(early, 0.99) * 1000:.0f} -> {pct(later, 0.99) * 1000:.0f} ms "
                f"({pct(later, 0.99) / pct(early, 0.99):.2f}x)"
            )
    if r.get("kept"):
        lines.append("  tasks held in memory at the end: " + ", ".join(f"{k} {v}" for k, v in r["kept"].items()))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--rate", type=float, default=8.0, help="tasks submitted per second (open loop)")
    ap.add_argument("--window-s", type=float, default=30.0, help="how often memory and latency are sampled")
    ap.add_argument("--warmup", type=float, default=0.2, help="share of the tasks before the first warm window")
    ap.add_argument("--max-in-flight", type=int, default=80, help="tasks in flight at most (the tenant's limit is 100)")
    ap.add_argument("--quota-share", type=float, default=1.0, help="MESH_QUOTA_SHARE for the mesh (the tenant's share)")
    a = ap.parse_args()
    if a.tasks < 1 or a.rate <= 0 or a.window_s <= 0 or not 0 <= a.warmup < 1 or a.max_in_flight < 1:
        ap.error("--tasks and --max-in-flight at least 1, --rate and --window-s above 0, --warmup in [0, 1)")
    if not 0 <= a.quota_share <= 1:
        ap.error("--quota-share is between 0 and 1")
    os.environ["MESH_QUOTA_SHARE"] = str(a.quota_share)  # the services of the mesh it starts take it
    try:
        r = asyncio.run(soak(a.tasks, a.rate, a.window_s, a.max_in_flight))
    except Exception as e:  # noqa: BLE001 - one line, as the other benches say a side that cannot run
        print(f"bench_soak: the mesh could not run the soak: {type(e).__name__}: {e}".splitlines()[0], file=sys.stderr)
        return 1
    print(report(r, a.warmup))
    return 0


if __name__ == "__main__":
    sys.exit(main())
