"""Comparing an eval report with a baseline (an earlier report of the same dataset): the pass
rate, each property's rate, the mean cost and (when asked) the p95 latency over the cases both
have, and the cases that passed then and fail now. What counts as a regression is the thresholds'
call; ``report.gate_failures`` fails the gate on any, ``meshctl release eval`` on any as well.

Public API::

    compare(baseline, current, *, max_regression=0.0, max_cost_increase=0.25, max_latency_increase=None,
            baseline_path="") -> dict                   # the report's ``comparison``
"""

from __future__ import annotations

import math
from typing import Any

from mesh_eval.report import _EPS, summarize


def compare(
    baseline: dict[str, Any],
    current: dict[str, Any],
    *,
    max_regression: float = 0.0,
    max_cost_increase: float = 0.25,
    max_latency_increase: float | None = None,
    baseline_path: str = "",
) -> dict[str, Any]:
    """Compare two reports. Metrics are computed over the cases both reports have (by id), so an
    added or removed case is listed, not counted as a regression. A regression is: the pass rate
    or a property's rate dropping by more than ``max_regression`` (absolute), a case that passed
    in the baseline failing now, the mean cost per case rising by more than ``max_cost_increase``
    (relative; any rise from 0 counts), and, when ``max_latency_increase`` is given, the p95
    latency rising by more than that (relative)."""
    before = {c["id"]: c for c in baseline["cases"]}
    now = {c["id"]: c for c in current["cases"]}
    common = [i for i in now if i in before]
    warnings = []
    if baseline.get("dataset_sha256") != current.get("dataset_sha256"):
        warnings.append(
            f"the baseline ran another version of the dataset (sha256 {str(baseline.get('dataset_sha256'))[:12]} "
            f"vs {str(current.get('dataset_sha256'))[:12]}); comparing the {len(common)} case(s) both have, by id"
        )
    metrics = (
        _metrics(
            summarize([before[i] for i in common]),
            summarize([now[i] for i in common]),
            max_regression=max_regression,
            max_cost_increase=max_cost_increase,
            max_latency_increase=max_latency_increase,
        )
        if common
        else []
    )
    newly_failing = [i for i in common if before[i]["passed"] and not now[i]["passed"]]
    newly_passing = [i for i in common if not before[i]["passed"] and now[i]["passed"]]
    regressions = sum(1 for m in metrics if not m["ok"]) + len(newly_failing)
    return {
        "baseline": baseline_path or str(baseline.get("run_id", "")),
        "baseline_run_id": baseline.get("run_id"),
        "common_cases": len(common),
        "warnings": warnings,
        "metrics": metrics,
        "newly_failing": newly_failing,
        "newly_passing": newly_passing,
        "missing_now": [i for i in before if i not in now],
        "new_cases": [i for i in now if i not in before],
        "thresholds": {
            "max_regression": max_regression,
            "max_cost_increase": max_cost_increase,
            "max_latency_increase": max_latency_increase,
        },
        "regressions": regressions,
    }


def _metrics(
    was: dict[str, Any],
    now: dict[str, Any],
    *,
    max_regression: float,
    max_cost_increase: float,
    max_latency_increase: float | None,
) -> list[dict[str, Any]]:
    """The two summaries' figures side by side, each ``ok`` or not: the pass rate and the rate of
    every property both have (a drop), the mean cost per case and, when asked, the p95 latency (a rise)."""
    out = [_drop("pass_rate", was["pass_rate"], now["pass_rate"], max_regression)]
    for prop in sorted(set(was["properties"]) & set(now["properties"])):
        rates = was["properties"][prop]["rate"], now["properties"][prop]["rate"]
        out.append(_drop(f"property {prop}", *rates, max_regression))
    out.append(_rise("mean cost_usd per case", was["cost_usd"]["mean"], now["cost_usd"]["mean"], max_cost_increase))
    if max_latency_increase is not None:
        out.append(_rise("latency p95 s", was["latency_s"]["p95"], now["latency_s"]["p95"], max_latency_increase))
    return out


def _drop(name: str, was: float, is_: float, max_regression: float) -> dict[str, Any]:
    """A rate that may fall by ``max_regression`` at most (absolute)."""
    delta = is_ - was
    return {
        "metric": name,
        "baseline": was,
        "now": is_,
        "delta": round(delta, 4),
        "ok": -delta <= max_regression + _EPS,
    }


def _rise(name: str, was: float | None, is_: float | None, limit: float) -> dict[str, Any]:
    """A figure that may rise by ``limit`` at most (relative); from 0, any rise is too much
    (``relative`` is then "inf": JSON has no infinity)."""
    if was is None or is_ is None:
        return {"metric": name, "baseline": was, "now": is_, "delta": None, "ok": True}
    rel: float | None
    if was > 0:
        rel = (is_ - was) / was
        ok = rel <= limit + _EPS
    else:
        rel, ok = (None, True) if is_ <= 0 else (math.inf, False)
    relative = "inf" if rel is not None and math.isinf(rel) else rel
    return {"metric": name, "baseline": was, "now": is_, "delta": round(is_ - was, 8), "relative": relative, "ok": ok}
