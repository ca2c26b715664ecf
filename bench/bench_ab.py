"""Before and after, side by side: the sample task on a base revision and on this checkout, in turn.

A change to the hot path moves CPU per task by a few percent; two benchmark runs minutes apart
on these shared machines differ by more than that. So this runs ``bench_task.measure`` on both
in alternation (A B B A A B ...), each in a fresh mesh of its own, and prints the medians and
the ratio of each figure (this checkout over the base) over the pairs.

The base revision is checked out into a temporary git worktree; its packages are put first on
``PYTHONPATH`` (ahead of this checkout's editable installs) for the benchmark process and every
process of its mesh. Both sides use this checkout's ``bench_task.py``, so the measurement is the
same; what differs is the code under it.

    python bench/bench_ab.py --base HEAD~3 [--pairs 3] [--tasks 16] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import asyncio, json, sys
import bench_task
r = asyncio.run(bench_task.measure(int(sys.argv[1]), int(sys.argv[2]), baseline=False))
print("RESULT " + json.dumps({k: r[k] for k in ("p50_ms", "tasks_per_s", "messages_per_task", "cpu_ms_per_task",
                                                  "client_outcome_only_ms")}))
"""


def package_dirs(tree: Path) -> list[str]:
    """Every package folder of a checkout (those with a pyproject.toml): contracts, libs/*, services/*."""
    found = [tree / "contracts", *sorted((tree / "libs").glob("*")), *sorted((tree / "services").glob("*"))]
    return [str(p) for p in found if (p / "pyproject.toml").is_file()]


def run(tree: Path, tasks: int, concurrency: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*package_dirs(tree), str(ROOT / "bench")]))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(tasks), str(concurrency)],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    raise SystemExit(f"the benchmark failed on {tree}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def figures(r: dict[str, Any]) -> dict[str, float]:
    cpu = r["cpu_ms_per_task"]
    out = {f"cpu {k}": v for k, v in cpu.items()}
    out["cpu mesh total"] = sum(v for k, v in cpu.items() if k != "client")
    out["tasks/s"] = r["tasks_per_s"]
    out["p50 ms (sequential)"] = r["p50_ms"]
    out["stored msgs per task"] = r["messages_per_task"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the revision to compare against (e.g. HEAD~3, a commit)")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=16, help="sequential tasks (the p50)")
    ap.add_argument("--concurrency", type=int, default=32, help="twice this many tasks in flight (the throughput)")
    a = ap.parse_args()
    if a.pairs < 1 or a.tasks < 1 or a.concurrency < 1:
        ap.error("--pairs, --tasks and --concurrency must be at least 1")
    rev = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{a.base}^{{commit}}"], cwd=ROOT,
                         capture_output=True, text=True)  # fmt: skip
    if rev.returncode != 0:
        ap.error(f"--base {a.base}: not a revision of this repository")
    with tempfile.TemporaryDirectory(prefix="agentmesh-ab-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), rev.stdout.strip()], cwd=ROOT, check=True,
                       capture_output=True)  # fmt: skip
        try:
            sides: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
            for i in range(a.pairs):
                order = [("base", base), ("this", ROOT)] if i % 2 == 0 else [("this", ROOT), ("base", base)]
                for name, tree in order:
                    f = figures(run(tree, a.tasks, a.concurrency))
                    sides[name].append(f)
                    print(f"  pair {i + 1}/{a.pairs}: {name:4} mesh CPU {f['cpu mesh total']:6.1f} ms/task, "
                          f"{f['tasks/s']:5.1f} tasks/s, p50 {f['p50 ms (sequential)']:6.1f} ms", file=sys.stderr,
                          flush=True)  # fmt: skip
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    print(f"sample task, base {a.base} ({rev.stdout.strip()[:10]}) vs this checkout, {a.pairs} pair(s), "
          f"{2 * a.concurrency} tasks in flight; medians, and this/base per pair (median, min-max)")  # fmt: skip
    keys = sorted(set(sides["base"][0]) & set(sides["this"][0]), key=lambda k: (not k.startswith("cpu"), k))
    for k in keys:
        b = [r[k] for r in sides["base"]]
        t = [r[k] for r in sides["this"]]
        ratios = [y / x for x, y in zip(b, t, strict=True) if x]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "-"
        ratio = f"{statistics.median(ratios):5.2f}x" if ratios else "  -  "
        print(f"  {k:<24} base {statistics.median(b):8.1f}  this {statistics.median(t):8.1f}  {ratio} ({spread})")


if __name__ == "__main__":
    main()
