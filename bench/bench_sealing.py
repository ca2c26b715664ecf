"""What sealing a tenant's content at rest costs per message (issue 42), against the same messages
written clear, in the same process.

For each message of a sample task's shape (a goal, a plan, a step's request and output with its
retrievals, a tool call and its result, the check, the answer) it times writing (``to_bytes``) and
reading (``parse``) with and without a keyring, and the stored size either way. The whole mesh's
figure (CPU per task, both ways) is ``python bench/bench_ab.py --base <a revision before sealing>``.

    python bench/bench_sealing.py [--rounds 2000]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable

from mesh_contracts import sealing
from mesh_contracts.v1 import (
    CheckRequested,
    Citation,
    PlanCreated,
    PlanStep,
    RetrievalCompleted,
    RetrievalHit,
    StepCompleted,
    StepRequested,
    StepResult,
    TaskCompleted,
    TaskSubmitted,
    ToolCompleted,
    ToolRequested,
)
from mesh_contracts.v1.records import TaskRecord
from mesh_identity.datakeys import Keyring, new_data_key, wrap

T = {"tenant": "acme", "task_id": "t-0123456789ab"}
PASSAGE = "JetStream stores every message of a stream on disk and replays it to consumers. " * 6


def samples() -> list[object]:
    steps = tuple(
        PlanStep(step_id=f"s{i}", instruction=f"Research part {i} of the question and cite the documents.")
        for i in range(3)
    )
    hits = tuple(
        RetrievalHit(
            doc_id=f"docs/{i}.md",
            chunk_id=str(i),
            text=PASSAGE,
            score=0.5,
            title=f"Doc {i}",
            version="v1",
            chunk_hash="0" * 64,
        )
        for i in range(4)
    )
    cites = tuple(Citation(doc_id=f"docs/{i}.md", chunk_id=str(i), version="v1", chunk_hash="0" * 64) for i in range(2))
    output = "AgentMesh keeps side effects exactly once [docs/1.md#1]. " * 8
    return [
        TaskSubmitted(**T, goal="How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."),
        PlanCreated(**T, steps=steps),
        StepRequested(**T, step=steps[0], inputs={"s0": output}),
        ToolRequested(
            **T,
            step_id="s1",
            call_id="c1",
            tool="send_email",
            arguments={"to": "ops@acme.test", "subject": "answer", "body": output},
        ),
        ToolCompleted(**T, step_id="s1", call_id="c1", tool="send_email", ok=True, result="sent: id 42"),
        RetrievalCompleted(**T, step_id="s0", call_id="r1", hits=hits),
        StepCompleted(**T, step_id="s0", output=output, citations=cites),
        CheckRequested(
            **T,
            goal="g",
            answer=output,
            citations=cites,
            steps=(StepResult(step_id="s0", output=output),),
            answer_step="s0",
        ),
        TaskCompleted(**T, answer=output, citations=cites),
    ]


def timed(fn, rounds: int) -> float:
    """Median of 5 runs of ``rounds`` calls, in microseconds per call."""
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        runs.append((time.perf_counter() - t0) / rounds * 1e6)
    return statistics.median(runs)


def pairs() -> list[tuple[str, Callable[[], bytes], Callable[[bytes], object]]]:
    """(name, write, read) of each sample."""
    out: list[tuple[str, Callable[[], bytes], Callable[[bytes], object]]] = []
    for m in samples():
        out.append((m.schema_id(), m.to_bytes, type(m).parse))  # type: ignore[attr-defined]
    rec = TaskRecord(**T, goal="How does AgentMesh avoid duplicate side effects?", feedback={"s0": PASSAGE})
    key = "acme.t-0123456789ab"
    out.append(("record.task (KV tasks)", lambda: rec.to_bytes(key), lambda b: TaskRecord.from_bytes(b, key)))
    return out


def measure(rounds: int) -> None:
    wrapped = {"acme": wrap(bytes(32), "acme", new_data_key())}
    ring = Keyring(bytes(32), lambda: wrapped)
    rows = []
    for name, write, read in pairs():
        out = {}
        for label, sealer in (("clear", None), ("sealed", ring)):
            sealing.install(sealer)
            body = write()
            out[label] = (len(body), timed(write, rounds), timed(functools.partial(read, body), rounds))
        sealing.install(None)
        rows.append((name, out))
    print(
        f"{'message':26} {'bytes clear':>11} {'sealed':>8} {'write µs':>9} {'sealed':>8} {'read µs':>8} {'sealed':>8}"
    )
    tot = {"cw": 0.0, "sw": 0.0, "cr": 0.0, "sr": 0.0, "cb": 0, "sb": 0}
    for name, o in rows:
        (cb, cw, cr), (sb, sw, sr) = o["clear"], o["sealed"]
        print(f"{name:26} {cb:11,} {sb:8,} {cw:9.1f} {sw:8.1f} {cr:8.1f} {sr:8.1f}")
        for k, v in (("cw", cw), ("sw", sw), ("cr", cr), ("sr", sr), ("cb", cb), ("sb", sb)):
            tot[k] += v
    print(
        f"\nall {len(rows)} together: write {tot['cw']:.0f} -> {tot['sw']:.0f} µs ({tot['sw'] / tot['cw']:.2f}x), "
        f"read {tot['cr']:.0f} -> {tot['sr']:.0f} µs ({tot['sr'] / tot['cr']:.2f}x), "
        f"bytes {tot['cb']:,} -> {tot['sb']:,} ({tot['sb'] / tot['cb']:.2f}x); "
        f"added CPU {tot['sw'] - tot['cw'] + tot['sr'] - tot['cr']:.0f} µs for one write and one read of each"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2000)
    measure(p.parse_args().rounds)
