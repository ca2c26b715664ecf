"""Stored writes per sample task, by stream and bucket and by kind: where a task's writes go, and
which of them the broker syncs to disk before it acknowledges.

Starts a local mesh, runs one warm-up task, then ``--tasks`` sample tasks one after another, and
prints each stream's growth in sequence numbers per task (a KV bucket is the stream
``KV_<bucket>``; every put, create, update or delete is one stored write). A stream made with
``persist_mode: async`` (the broker writes it back later) is counted apart from the synced ones:
the synced count is what the write budget (README, "Durable writes per task") bounds.

``--by-kind`` also names each write: the subject it was stored on, with the tenant, task, step
and call ids taken out (seen by an admin subscription while the tasks ran). ``--json`` prints
the counts as one JSON object (what ``tests/e2e/test_write_budget.py`` reads).

    python bench/bench_writes.py [--tasks 10] [--by-kind] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import nats
from bench_task import GOAL

from mesh_testing.rights import matches
from meshctl import local
from meshctl.client import TenantClient

TENANT = "bench"

BUDGET: dict[str, float] = {
    # messages: the protocol itself (v1)
    "TASK": 3, "STEP": 6, "TOOL": 2, "RAG": 2, "CHECK": 2, "USAGE": 6,
    # records
    # 6 transitions; a published outbox is cleared by the next one's write, or after 2 s by a write
    # of its own (the last one's, and any whose next came later): 7 here, 12 at most
    "KV_tasks": 12,
    "KV_steps": 4,  # one checkpoint per model turn that asks for a call (the answer is step.completed alone)
    "KV_reservations": 6,  # each grant, before the caller hears of it (outlives a Redis loss)
    "KV_ledger": 2,  # the one tool effect: its claim, then its result
    "KV_status": 2, "KV_admission": 2, "KV_evidence": 1,
}  # fmt: skip
"""Synced stored writes a sample task may make, per stream and bucket (README, "Durable writes per
task"): ``tests/e2e/test_write_budget.py`` holds every run to it, and a synced write to anything
not named here or in ``TIMED`` is over budget. Lower a number when a change cuts writes; raising
one is a decision the README's table has to explain."""
TIMED: dict[str, str] = {
    "KV_budget": "a task's spend checkpoint when it ends, and the tenant-day's and accounts' every second",
    "KV_quotas": "a submission's charge at the door, and what each service stored for the tenant every 5 s",
}
"""Synced writes made on a timer, so their count per task depends on how many tasks share a second:
measured and printed, not budgeted per task (about 1.4 and 2.7-4.4 per task one after another)."""
UNSYNCED_BUDGET = 41.0
"""Writes to streams written back asynchronously (EVENTS 18, ENVELOPES 15, KV_calls 8): no fsync,
but still bytes, CPU and a broker's work."""


async def streams(js: Any) -> dict[str, tuple[int, bool, list[str], int]]:
    """name -> (last sequence, synced per message, subjects, bytes held) of every stream."""
    out = {}
    for si in await js.streams_info():
        mode = str(getattr(si.config.persist_mode, "value", si.config.persist_mode) or "default")
        out[si.config.name] = (si.state.last_seq, mode != "async", list(si.config.subjects or []), si.state.bytes)
    return out


IDS = [
    (re.compile(r"\bt-[0-9a-f]{6,}\b"), "<task>"),
    (re.compile(r"\b(s\d+|plan|judge)(-(r|a)\d+)?(-i\d+)?(-c\d+)?(-\d+)?\b"), "<call>"),
    (re.compile(r"\b20\d{6}\b"), "<day>"),
]


def kind(subject: str) -> str:
    """``subject`` with the ids of one task taken out: what kind of write it is."""
    subject = subject.replace(f".{TENANT}.", ".<tenant>.").replace(f".{TENANT}", ".<tenant>")
    for rx, name in IDS:
        subject = rx.sub(name, subject)
    return subject


async def measure(tasks: int, *, by_kind: bool = False) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="agentmesh-writes-"))
    state = await local.up(home, tenants=[TENANT], nats_port=0, http_port=0, redis_port=0)
    ids = local.Identities(home)
    seen: Counter[tuple[str, str]] = Counter()
    try:
        nc = await nats.connect(state.nats_url, **ids.connect_options("admin"))
        js = nc.jetstream()
        async with TenantClient.of(ids, state.nats_url, TENANT) as c:
            await c.submit(GOAL, timeout=60)
            await asyncio.sleep(1.0)  # the warm-up's trailing writes (usage accounting) land
            before = await streams(js)
            by_subject = {n: subjects for n, (_, _, subjects, _) in before.items()}

            async def on_msg(msg: Any) -> None:
                if (msg.reply or "").startswith("$JS.ACK."):
                    return  # a consumer's delivery of a stored message, not a write
                for name, subjects in by_subject.items():
                    if any(matches(p, msg.subject) for p in subjects):
                        seen[(name, kind(msg.subject))] += 1
                        return

            sub = await nc.subscribe(">", cb=on_msg) if by_kind else None
            for _ in range(tasks):
                await c.submit(GOAL, timeout=60)
            await asyncio.sleep(2.0)
            after = await streams(js)
            if sub is not None:
                await sub.unsubscribe()
        await nc.close()
    finally:
        local.down(home)
    per = {k: (after[k][0] - before.get(k, (0, True, [], 0))[0]) / tasks for k in after}
    kb = {k: (after[k][3] - before.get(k, (0, True, [], 0))[3]) / tasks / 1024 for k in after}
    synced = {k: n for k, n in per.items() if n and after[k][1]}
    unsynced = sum(n for k, n in per.items() if not after[k][1])
    over = [
        f"{k} {n:g} > {BUDGET.get(k, 0):g}"
        for k, n in sorted(synced.items())
        if k not in TIMED and n > BUDGET.get(k, 0)
    ]
    if unsynced > UNSYNCED_BUDGET:
        over.append(f"unsynced {unsynced:g} > {UNSYNCED_BUDGET:g}")
    return {
        "tasks": tasks,
        "streams": {
            k: {"writes": n, "synced": after[k][1], "budget": BUDGET.get(k), "kb": kb[k]} for k, n in per.items() if n
        },
        "synced": sum(synced.values()),
        "timed": sum(n for k, n in synced.items() if k in TIMED),
        "unsynced": unsynced,
        "budget": sum(BUDGET.values()),
        "over": over,
        "kinds": {f"{s} {k}": n / tasks for (s, k), n in sorted(seen.items())},
    }


def report(r: dict[str, Any]) -> str:
    lines = [
        f"stored writes (and bytes held, headers included) per sample task ({r['tasks']} tasks, one after another):"
    ]
    rows = sorted(r["streams"].items(), key=lambda kv: (-kv[1]["writes"], kv[0]))
    for name, row in rows:
        budget = f"budget {row['budget']:g}" if row["budget"] is not None else "NO BUDGET"
        how = budget if row["synced"] else "async (not synced)"
        how = f"timed: {TIMED[name]}" if name in TIMED else how
        lines.append(f"  {name:<20} {row['writes']:6.1f}  {row['kb']:6.1f} KB  {how}")
    lines.append(f"  {'synced':<20} {r['synced']:6.1f}  budget {r['budget']:g} + timed {r['timed']:.1f}")
    lines.append(f"  {'async':<20} {r['unsynced']:6.1f}  budget {UNSYNCED_BUDGET:g}")
    lines.append(f"  {'total':<20} {r['synced'] + r['unsynced']:6.1f}")
    lines.append(f"  within the budget: {'yes' if not r['over'] else 'NO: ' + '; '.join(r['over'])}")
    if r["kinds"]:
        lines.append("by kind (subjects seen, ids taken out; a sourced copy has no subject of its own):")
        lines += [f"  {n:6.1f}  {k}" for k, n in sorted(r["kinds"].items(), key=lambda kv: (kv[0].split()[0], -kv[1]))]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10)
    ap.add_argument("--by-kind", action="store_true", help="name each write by its subject, ids taken out")
    ap.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    a = ap.parse_args()
    if a.tasks < 1:
        ap.error("--tasks must be at least 1")
    result = asyncio.run(measure(a.tasks, by_kind=a.by_kind))
    print(json.dumps(result) if a.json else report(result))
