"""A registered workflow against the model's own plan for the same question, in one mesh.

Starts a local mesh, names an author, publishes ``examples/workflows/docs-answer.yaml`` (look it
up, compute, answer) and then runs ``--rounds`` rounds of: one task the model plans from the goal
(the baseline), one task that names the workflow. Both ask the same thing of the same scripted
model. Prints each kind's latency (p50, p95) and stored writes per task, and the ratios
workflow / planned, all from this one run.

    python bench/bench_workflow.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
import yaml

from mesh_contracts.v1 import TaskCompleted, WorkflowChange
from mesh_identity import Signer
from meshctl import approvers, local
from meshctl.client import TenantClient

GOAL = "How are identity tokens checked? Also compute 17 * 23."
INPUTS = {"question": "How are identity tokens checked?", "expression": "17 * 23"}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "workflows" / "docs-answer.yaml"


async def seqs(js: Any) -> int:
    return sum(si.state.last_seq for si in await js.streams_info())


async def main(rounds: int) -> None:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-workflow-"))
    state = await local.up(home, tenants=["bench"], nats_port=0, http_port=0, redis_port=0)
    ids = local.Identities(home)
    times: dict[str, list[float]] = {"planned": [], "workflow": []}
    writes: dict[str, list[int]] = {"planned": [], "workflow": []}
    try:
        author, _ = await approvers.add(ids, "bench", "ann", state.nats_url, role="author")
        signer = Signer.from_file(author, ids.signing_key(author))
        nc = await nats.connect(state.nats_url, **ids.connect_options("admin"))
        js = nc.jetstream()
        async with TenantClient.of(ids, state.nats_url, "bench") as c:
            change = WorkflowChange(tenant="bench", task_id="wf-bench", action="publish", name="docs-answer",
                                    definition=yaml.safe_load(EXAMPLE.read_text()), author=author)  # fmt: skip
            t0 = time.perf_counter()
            answer = await c.change_workflow(change, signer)
            print(
                f"published docs-answer@{getattr(answer, 'version', '?')} in {1000 * (time.perf_counter() - t0):.0f} ms"
            )
            for kind in ("planned", "workflow"):  # warm-up, one of each
                await c.submit(GOAL, workflow="docs-answer" if kind == "workflow" else None,
                               inputs=INPUTS if kind == "workflow" else None, timeout=60)  # fmt: skip
            for _ in range(rounds):
                for kind in ("planned", "workflow"):
                    await asyncio.sleep(1.0)  # the last task's trailing writes (usage accounting) land
                    before = await seqs(js)
                    t0 = time.perf_counter()
                    seen = await c.submit(GOAL, workflow="docs-answer" if kind == "workflow" else None,
                                          inputs=INPUTS if kind == "workflow" else None, timeout=60)  # fmt: skip
                    took = time.perf_counter() - t0
                    if not isinstance(seen.outcome, TaskCompleted):
                        raise SystemExit(f"{kind} task did not complete: {seen.outcome}")
                    await asyncio.sleep(1.0)
                    writes[kind].append(await seqs(js) - before)
                    times[kind].append(took)
        await nc.close()
    finally:
        local.down(home)

    def p(xs: list[float], q: float) -> float:
        return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1000

    print(f"{rounds} rounds, alternating; the scripted model")
    print(f"  {'':10} {'p50 ms':>8} {'p95 ms':>8} {'writes/task':>12}")
    for kind in ("planned", "workflow"):
        print(
            f"  {kind:10} {p(times[kind], 0.5):8.0f} {p(times[kind], 0.95):8.0f} {statistics.mean(writes[kind]):12.1f}"
        )
    print(f"  ratio workflow/planned: p50 {p(times['workflow'], 0.5) / p(times['planned'], 0.5):.2f}x, "
          f"writes {statistics.mean(writes['workflow']) / statistics.mean(writes['planned']):.2f}x")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    asyncio.run(main(a.rounds))
