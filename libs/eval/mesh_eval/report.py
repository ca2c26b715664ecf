"""An eval run's report: the JSON document ``meshctl eval`` writes (format ``FORMAT``), with the
dataset it ran (path and sha256), the run's id and times, the prompt versions seen, a summary
(pass rate, each property's rate, latency percentiles, cost, tokens, the judge's scores) and one
entry per case; the gate on it; writing it, and reading one back as a baseline.

Public API::

    build_report(dataset, cases, *, run_id, started_at, finished_at, concurrency) -> dict
    summarize(cases) -> dict;  percentile(values, p) -> float | None;  prompt_versions(cases) -> dict
    gate_failures(report, *, min_pass_rate) -> list[str]     # one line per failed gate
    load_report(path) -> dict;  write_report(report, path) -> Path;  default_report_path() -> Path

Percentiles are nearest-rank: the value at rank ``ceil(p/100 * n)`` of the sorted latencies.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from mesh_eval.dataset import Dataset
from mesh_eval.errors import EvalError, one_line

FORMAT = 1
_EPS = 1e-9
"""Slack when a computed figure meets a limit (float rounding is not a regression)."""


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile: the value at rank ``ceil(p/100 * n)`` (1-based) of the sorted
    values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The report's ``summary`` from its case entries. Skipped properties do not count."""
    n = len(cases)
    passed = sum(1 for c in cases if c["passed"])
    props: dict[str, dict[str, Any]] = {}
    for c in cases:
        for name, p in c["properties"].items():
            if p.get("skipped"):
                continue
            tally = props.setdefault(name, {"passed": 0, "total": 0})
            tally["total"] += 1
            tally["passed"] += bool(p["passed"])
    for tally in props.values():
        tally["rate"] = round(tally["passed"] / tally["total"], 4)
    latencies = [float(c["latency_s"]) for c in cases if c.get("latency_s") is not None]
    costs = [float(c.get("cost_usd") or 0.0) for c in cases]
    tokens = [int(c["tokens"]["input"]) + int(c["tokens"]["output"]) for c in cases]
    judged = [float(c["judge_score"]) for c in cases if c.get("judge_score") is not None]
    return {
        "cases": n,
        "passed": passed,
        "pass_rate": round(passed / n, 4) if n else 0.0,
        "properties": dict(sorted(props.items())),
        "latency_s": {
            "p50": _r(percentile(latencies, 50), 3),
            "p95": _r(percentile(latencies, 95), 3),
            "max": _r(max(latencies) if latencies else None, 3),
        },
        "cost_usd": {"total": round(sum(costs), 8), "mean": round(_mean(costs) or 0.0, 8)},
        "tokens": {"total": sum(tokens), "mean": round(_mean(tokens) or 0.0, 1)},
        "judge_score": {"mean": _r(_mean(judged)), "min": _r(min(judged) if judged else None), "n": len(judged)},
    }


def prompt_versions(cases: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Every prompt version seen, per role."""
    out: dict[str, set[str]] = {}
    for c in cases:
        for role, ref in (c.get("prompt_versions") or {}).items():
            out.setdefault(role, set()).add(ref)
    return {role: sorted(refs) for role, refs in sorted(out.items())}


def build_report(
    dataset: Dataset,
    cases: Sequence[dict[str, Any]],
    *,
    run_id: str,
    started_at: datetime,
    finished_at: datetime,
    concurrency: int,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "dataset": dataset.path,
        "dataset_sha256": dataset.sha256,
        "run_id": run_id,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": finished_at.isoformat(timespec="seconds"),
        "concurrency": concurrency,
        "prompt_versions": prompt_versions(cases),
        "summary": summarize(cases),
        "cases": list(cases),
    }


def gate_failures(report: dict[str, Any], *, min_pass_rate: float = 1.0) -> list[str]:
    """One line per failed gate: the pass rate, and the baseline comparison when there is one."""
    out = []
    rate = report["summary"]["pass_rate"]
    if rate < min_pass_rate:
        out.append(f"pass rate {rate:.4f} is below --min-pass-rate {min_pass_rate:g}")
    comparison = report.get("comparison")
    if comparison and comparison["regressions"]:
        out.append(f"{comparison['regressions']} regression(s) against baseline {comparison['baseline']}")
    return out


def default_report_path(now: datetime | None = None) -> Path:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return Path(".mesh") / "eval" / f"report-{stamp}.json"


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(report, indent=2) + "\n")
    return p


def load_report(path: str | Path) -> dict[str, Any]:
    """A report written by ``meshctl eval``; EvalError (one line) when it is missing or is not one."""
    p = Path(path)
    if not p.is_file():
        raise EvalError(f"baseline report {path}: no such file")
    try:
        report = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvalError(f"baseline report {path}: not JSON ({one_line(str(exc))})") from None
    ok = (
        isinstance(report, dict)
        and report.get("format") == FORMAT
        and isinstance(report.get("cases"), list)
        and isinstance(report.get("summary"), dict)
        and all(isinstance(c, dict) and {"id", "passed", "properties"} <= c.keys() for c in report["cases"])
    )
    if not ok:
        raise EvalError(f"baseline report {path}: not an eval report (format {FORMAT} with summary and cases)")
    return cast("dict[str, Any]", report)  # json.loads: checked above to be a report object
