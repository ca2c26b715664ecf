"""Many tenants at once: a steady tenant's latency while another bursts (``make bench``).

A local mesh with two tenants. The steady tenant runs the sample task one after another, first
alone (quiet) and then while the burst tenant submits ``--burst`` tasks at once (as fast as one
client publishes them). Prints the steady tenant's p50/p99 under the burst against quiet, how
many of the burst were admitted and refused (and with which code and retry-after), and that
every admitted task ended (completed or failed with a reason): nothing admitted was lost.
Loopback only, bounded by the burst size.

    python bench/bench_admission.py [--burst 1000] [--quiet-tasks 10] [--run-slots default|N ...] [--alone N]

With no ``--run-slots`` the mesh runs on its defaults (run slots 1, 8 for a tenant alone: fair by
default). ``--run-slots N`` runs it with ``MESH_RUN_SLOTS=N`` (the planner's fair share of N
tasks running at once; 0: off, every admitted task starts at once). Several values run one
after the other, each on a fresh mesh, and a last line compares them (``make bench``: the
defaults and 0).

``--latency-ms L`` gives every model call L ms (the scripted model as a remote model: what a task
waits on in production), so the mesh waits on its models rather than on two saturated cores.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench_scale import model_config

from mesh_contracts.v1 import TaskCompleted, TaskRejected
from mesh_planner.settings import PlannerSettings
from meshctl import local
from meshctl.client import TenantClient

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
BOUND = 2.0  # the bar: steady p50 under a burst within 2x quiet


def slots_arg(text: str) -> int | None:
    """``--run-slots``: ``default`` (the mesh's own) or a number."""
    if text == "default":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of run slots: {text!r} (use 'default' or N)") from None


def describe(given: int | None, slots: int, alone: int) -> str:
    what = "off" if slots == 0 else f"{slots}, {alone or slots} for a tenant alone"
    return f"{what} ({'defaults' if given is None else 'set'})"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _env(home: Path, run_slots: int | None, alone: int | None, latency_ms: float) -> dict[str, str]:
    """The planner's settings this run changes from the defaults, and the model's latency."""
    env = {}
    if run_slots is not None:
        env["MESH_RUN_SLOTS"] = str(run_slots)
    if alone is not None:
        env["MESH_RUN_SLOTS_ALONE"] = str(alone)
    if latency_ms:
        env["MESH_MODEL_CONFIG"] = str(model_config(home.parent / f"{home.name}-models.json", latency_ms))
    return env


async def main(
    burst: int, quiet_tasks: int, run_slots: int | None = None, latency_ms: float = 0.0, alone: int | None = None
) -> tuple[float, float, float]:
    """One run; returns the steady tenant's p50 and p95 under the burst over quiet, and how long
    the burst took to drain. ``None``: the mesh's default."""
    home = Path(tempfile.mkdtemp(prefix="agentmesh-admission-"))
    defaults = PlannerSettings.model_fields
    slots = defaults["run_slots"].default if run_slots is None else run_slots
    alone_n = defaults["run_slots_alone"].default if alone is None else alone
    try:
        env = _env(home, run_slots, alone, latency_ms)
        state = await local.up(
            home, tenants=["burst", "steady"], nats_port=0, http_port=0, redis_port=0, service_env_extra=env or None
        )
        ids = local.Identities(home)
        async with (
            TenantClient.of(ids, state.nats_url, "steady") as s,
            TenantClient.of(ids, state.nats_url, "burst") as b,
        ):
            await s.submit(GOAL, progress=False, timeout=120)  # warm-up
            quiet = []
            for _ in range(quiet_tasks):
                seen = await s.submit(GOAL, progress=False, timeout=120)
                assert isinstance(seen.outcome, TaskCompleted), seen.outcome
                quiet.append(seen.latency_s)

            t0 = time.perf_counter()
            flood = [asyncio.create_task(b.submit(GOAL, progress=False, timeout=600)) for _ in range(burst)]
            under: list[float] = []
            while not all(f.done() for f in flood):
                seen = await s.submit(GOAL, progress=False, timeout=600)
                under.append(seen.latency_s if isinstance(seen.outcome, TaskCompleted) else float("inf"))
            outcomes = [f.result().outcome for f in flood]
            drained = time.perf_counter() - t0
        kinds = Counter(
            f"refused ({o.code})" if isinstance(o, TaskRejected) else type(o).__name__ if o else "no outcome"
            for o in outcomes
        )
        waits = [o.retry_after_s for o in outcomes if isinstance(o, TaskRejected) and o.retry_after_s is not None]
        refused = sum(v for k, v in kinds.items() if k.startswith("refused"))
        lost = kinds.get("no outcome", 0)
        q50, u50 = statistics.median(quiet), statistics.median(under)
        print(f"admission: tenant 'burst' submits {burst} tasks at once while tenant 'steady' runs the sample task "
              f"one after another (defaults: 100 in flight, 50/s with bursts of 200, per tenant; "
              f"run slots: {describe(run_slots, slots, alone_n)}; model: {f'{latency_ms:g} ms a call' if latency_ms else 'scripted, instant'})")  # fmt: skip
        print(
            f"  steady tenant quiet:       p50 {q50 * 1000:7.0f} ms  p95 {pct(quiet, 0.95) * 1000:7.0f} ms  "
            f"p99 {pct(quiet, 0.99) * 1000:7.0f} ms  ({len(quiet)} tasks)"
        )
        u95, q95 = pct(under, 0.95), pct(quiet, 0.95)
        met = u50 <= BOUND * q50 and u95 <= BOUND * q95
        print(f"  steady tenant under burst: p50 {u50 * 1000:7.0f} ms  p95 {u95 * 1000:7.0f} ms  "
              f"p99 {pct(under, 0.99) * 1000:7.0f} ms  ({len(under)} tasks)  -> p50 {u50 / q50:.2f}x, p95 {u95 / q95:.2f}x "
              f"quiet (bar {BOUND:g}x both: {'met' if met else 'not met'})")  # fmt: skip
        print(f"  steady tenant under burst, in submission order (s): {' '.join(f'{x:.2f}' for x in under)}")
        print(
            f"  burst: {burst - refused} admitted, {refused} refused at the door; outcomes {dict(sorted(kinds.items()))}"
        )
        if waits:
            print(
                f"  retry_after_s given: min {min(waits):.2f}, median {statistics.median(waits):.2f}, max {max(waits):.2f}"
            )
            # When each refused client was told to come back (refused at + its wait): spread, or a herd?
            back = sorted(
                f.result().finished_at + f.result().outcome.retry_after_s
                for f in flood
                if isinstance(f.result().outcome, TaskRejected) and f.result().outcome.retry_after_s is not None
            )
            herd = max(sum(1 for y in back[i:] if y - x < 0.1) for i, x in enumerate(back))
            print(f"  the refused come back over {back[-1] - back[0]:.1f} s, at most {herd} within any 100 ms")
        print(f"  admitted and not ended (lost): {lost}; the burst drained in {drained:.1f} s")
        return u50 / q50, u95 / q95, drained
    finally:
        local.down(home)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--quiet-tasks", type=int, default=10)
    ap.add_argument("--run-slots", type=slots_arg, nargs="+", default=[None],
                    help="MESH_RUN_SLOTS for the mesh ('default', or N; 0: off); several: one run each")  # fmt: skip
    ap.add_argument("--latency-ms", type=float, default=0.0, help="each model call takes this long (0: instant)")
    ap.add_argument("--alone", type=int, default=None,
                    help="MESH_RUN_SLOTS_ALONE: tasks a tenant may run while no other has any (0: the run slots; "
                         "default: the mesh's)")  # fmt: skip
    a = ap.parse_args()
    if a.burst < 1 or a.quiet_tasks < 1 or min(s or 0 for s in a.run_slots) < 0 or a.latency_ms < 0:
        ap.error("--burst and --quiet-tasks must be at least 1, --run-slots and --latency-ms at least 0")
    ratios = {}
    for slots in a.run_slots:
        ratios[slots] = asyncio.run(main(a.burst, a.quiet_tasks, slots, a.latency_ms, a.alone))
    if len(ratios) > 1:
        print("steady under burst / quiet (p50, p95) and the burst's drain, by run slots: " + "; ".join(
            f"{'defaults' if s is None else 'off' if s == 0 else s}: {r50:.2f}x, {r95:.2f}x, {d:.1f} s"
            for s, (r50, r95, d) in ratios.items()) + f" (bar {BOUND:g}x)")  # fmt: skip
