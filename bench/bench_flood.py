"""One tenant floods every stream it can write to; another's latency meanwhile (``make bench``).

A local mesh with two tenants. ``steady`` runs the sample task one after another throughout;
the phases alternate, quiet then flood, ``--rounds`` times (so the quiet baseline is taken
between floods, not once before them, on a machine whose load drifts). During a flood a second
process, as tenant ``flood`` with its own credentials, hands in as fast as it can:

- valid submissions, control messages and ingests (until its quotas refuse them: 8 MiB in TASK
  and RAG, 4 MiB in CONTROL for this run, ``MESH_QUOTA_TENANTS``), and
- submissions of 1.1 MB with no valid token (the attack of issue 36), which the door refuses.

Prints steady's p50 / p95 in the quiet and the flood phases (and the ratio against issue 36's
bar of 2x), what the flooder stored against its quotas and how it was refused.

    python bench/bench_flood.py [--rounds 2] [--phase-s 15]
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
import time
import uuid
from collections import Counter
from pathlib import Path

import nats

from mesh_contracts.topology import door_subject
from mesh_contracts.v1 import ControlHalt, IngestRequested, TaskCompleted, TaskSubmitted
from mesh_kit import envelope as env
from mesh_kit.door import DoorRefused
from meshctl import local
from meshctl.client import TenantClient

GOAL = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
BOUND = 2.0
QUOTAS = {"flood": {"TASK": {"mib": 8}, "CONTROL": {"mib": 4}, "RAG": {"mib": 8}}}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


async def flood(home: Path, url: str, seconds: float, concurrency: int = 32) -> dict[str, object]:
    """The flooder (a process of its own): hand in as fast as the door answers, for ``seconds``."""
    ids = local.Identities(home)
    stored: Counter[str] = Counter()
    refused: Counter[str] = Counter()
    sent = 0
    deadline = time.monotonic() + seconds
    async with TenantClient.of(ids, url, "flood") as c:
        raw = await nats.connect(url, **ids.connect_options("client.flood"))
        junk = json.dumps({"type": "task.submitted", "tenant": "flood", "task_id": "x", "goal": "x" * 1_100_000})

        def message(i: int) -> TaskSubmitted | ControlHalt | IngestRequested | None:
            kind = i % 4
            if kind == 0:
                return TaskSubmitted(tenant="flood", task_id=f"f-{i}", goal=f"{i} " + "Please summarise this. " * 430)
            if kind == 1:
                return ControlHalt(tenant="flood", task_id=f"c-{i}", reason="stop " * 3000)
            if kind == 2:
                return IngestRequested(tenant="flood", task_id=f"i-{i}", doc_id=f"d{i}.md", media_type="text/plain",
                                       content_b64="!" * 200_000)  # fmt: skip
            return None  # the tokenless 1.1 MB submission

        async def one(i: int) -> None:
            nonlocal sent
            m = message(i)
            sent += 1
            if m is None:
                headers = {env.MSG_ID: f"junk-{i}", env.SCHEMA: "task.submitted/v1", env.IDENTITY: "none"}
                try:
                    await raw.jetstream(timeout=5).publish(door_subject(f"task.v1.flood.j-{i}.submitted"),
                                                            junk.encode(), headers=headers)  # fmt: skip
                    stored["junk"] += 1
                except nats.js.errors.APIError as exc:
                    refused[f"junk: {(exc.description or '').split(':')[0]}"] += 1
                return
            try:
                ack = await c.publish(m, key=uuid.uuid4().hex[:12], within_s=2.0)
                if not ack.duplicate:
                    stored[ack.stream] += len(m.to_bytes())
            except DoorRefused as exc:
                refused[f"{m.spec.domain}: {exc.code}"] += 1

        async def worker(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                await one(i)
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        await raw.close()
    return {"sent": sent, "stored_bytes": dict(stored), "refused": dict(refused)}


async def main(rounds: int, phase_s: float) -> float:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-flood-"))
    try:
        env_extra = {"MESH_QUOTA_TENANTS": json.dumps(QUOTAS), "MESH_RAG_SEED_TENANTS": "steady"}
        state = await local.up(home, tenants=["flood", "steady"], nats_port=0, http_port=0, redis_port=0,
                               service_env_extra=env_extra)  # fmt: skip
        ids = local.Identities(home)
        quiet: list[float] = []
        flooded: list[float] = []
        reports = []
        async with TenantClient.of(ids, state.nats_url, "steady") as s:
            await s.submit(GOAL, progress=False, timeout=120)  # warm-up

            async def steady_for(seconds: float, into: list[float]) -> None:
                until = time.monotonic() + seconds
                while time.monotonic() < until:
                    seen = await s.submit(GOAL, progress=False, timeout=120)
                    assert isinstance(seen.outcome, TaskCompleted), seen.outcome
                    into.append(seen.latency_s)

            for _ in range(rounds):
                await steady_for(phase_s, quiet)
                child = await asyncio.create_subprocess_exec(
                    sys.executable, __file__, "--flood-as", str(home), state.nats_url, str(phase_s),
                    stdout=subprocess.PIPE,
                )  # fmt: skip
                await asyncio.sleep(0.5)  # the flooder connected and going
                await steady_for(phase_s - 0.5, flooded)
                out, _ = await child.communicate()
                reports.append(json.loads(out.decode().strip().splitlines()[-1]))
        q50, f50 = statistics.median(quiet), statistics.median(flooded)
        print(f"flood: tenant 'flood' hands in valid submissions, control messages and ingests and tokenless 1.1 MB "
              f"submissions at 32 in flight, {rounds} phase(s) of {phase_s:g} s, between quiet phases; quotas "
              f"{json.dumps(QUOTAS['flood'])}")  # fmt: skip
        print(f"  steady tenant quiet:       p50 {q50 * 1000:7.0f} ms  p95 {pct(quiet, 0.95) * 1000:7.0f} ms  ({len(quiet)} tasks)")  # fmt: skip
        print(f"  steady tenant under flood: p50 {f50 * 1000:7.0f} ms  p95 {pct(flooded, 0.95) * 1000:7.0f} ms  "
              f"({len(flooded)} tasks)  -> {f50 / q50:.2f}x quiet, p95 {pct(flooded, 0.95) / pct(quiet, 0.95):.2f}x "
              f"(bar {BOUND:g}x: {'met' if f50 <= BOUND * q50 else 'not met'})")  # fmt: skip
        for i, r in enumerate(reports, 1):
            stored = {k: f"{v / (1 << 20):.2f} MiB" if k != "junk" else v for k, v in r["stored_bytes"].items()}
            print(f"  flood {i}: {r['sent']} messages ({r['sent'] / phase_s:.0f}/s); stored {stored}; refused "
                  f"{dict(sorted(r['refused'].items()))}")  # fmt: skip
        return f50 / q50
    finally:
        local.down(home)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--phase-s", type=float, default=15.0)
    ap.add_argument("--flood-as", nargs=3, metavar=("HOME", "URL", "SECONDS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.flood_as:
        report = asyncio.run(flood(Path(a.flood_as[0]), a.flood_as[1], float(a.flood_as[2])))
        print(json.dumps(report))
        sys.exit(0)
    if a.rounds < 1 or a.phase_s < 2:
        ap.error("--rounds must be at least 1 and --phase-s at least 2")
    asyncio.run(main(a.rounds, a.phase_s))
