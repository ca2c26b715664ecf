"""The write budget (README, "Durable writes per task"): the synced stored writes a sample task
makes, per stream and bucket, through a real local mesh, never more than ``bench_writes.BUDGET``.

The count is deterministic (every write is one of the protocol's; no timing decides it) except
the quota and spend checkpoints, which are flushed on a timer (``bench_writes.TIMED``: measured,
not budgeted per task). A synced write to a stream or bucket the budget does not name is over it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MESSAGES = ("TASK", "STEP", "TOOL", "RAG", "CHECK", "USAGE")


def test_a_sample_task_stays_within_its_write_budget():
    p = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_writes.py"), "--tasks", "3", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    streams = r["streams"]
    assert r["over"] == [], f"over the write budget: {r['over']}"
    # The messages are exact (a redelivery republishes under the same id: deduplicated), so a
    # count below its budget is a protocol change to write down in the budget, not slack
    for name in MESSAGES:
        assert streams[name]["writes"] == streams[name]["budget"], f"{name}: {streams[name]}"
    # and every kind of message is still made (a task that did less would pass a bound alone)
    assert {"KV_steps", "KV_tasks", "KV_reservations", "KV_ledger"} <= set(streams)
    assert not streams["EVENTS"]["synced"] and streams["EVENTS"]["writes"] >= 10, "progress still told, unsynced"
