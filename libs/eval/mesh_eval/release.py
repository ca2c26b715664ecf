"""``meshctl release eval``: a release's golden-set run, compared with the current version's
(meshctl finds it through the ``meshctl.release_eval`` entry point of this package).

The dataset's cases of the release's tenant run through the real mesh with the version pinned on
every submission (``TaskSubmitted.release``); the report is compared with the baseline (the
current version's recorded evaluation, or a report file) by ``baseline.compare``: a pass-rate or
property-rate drop beyond ``max_regression``, a case that passed and fails now, the mean cost
rising beyond ``max_cost_increase`` (and, when given, p95 latency beyond
``max_latency_increase``), the judge's mean score over the cases both judged falling by more than
``max_judge_drop`` is a regression; any regression fails the gate.
"""

from __future__ import annotations

import time
from typing import Any

from mesh_contracts.v1.release import ReleaseEvaluation
from mesh_eval.baseline import compare
from mesh_eval.dataset import load_dataset
from mesh_eval.errors import EvalError
from mesh_eval.harness import run_dataset


async def evaluate(
    client: Any,
    dataset_path: str,
    version: str,
    baseline: dict[str, Any],
    *,
    against: str = "",
    concurrency: int = 4,
    timeout_s: float = 120.0,
    max_regression: float = 0.0,
    max_cost_increase: float = 0.25,
    max_latency_increase: float | None = None,
    max_judge_drop: float = 0.05,
    progress: bool = True,
) -> tuple[dict[str, Any], ReleaseEvaluation]:
    """(report, evaluation) of ``version`` of ``client``'s tenant over the dataset's cases of that tenant."""
    dataset = load_dataset(dataset_path)
    mine = [c.id for c in dataset.cases if c.tenant == client.tenant]
    if not mine:
        raise EvalError(f"{dataset_path} has no case of tenant {client.tenant}")
    dataset = dataset.select(case_ids=mine)
    report = await run_dataset(
        dataset, clients={client.tenant: client}, concurrency=concurrency, timeout_s=timeout_s, progress=progress,
        release=version,
    )  # fmt: skip
    comparison = compare(
        baseline, report, max_regression=max_regression, max_cost_increase=max_cost_increase,
        max_latency_increase=max_latency_increase, baseline_path=against,
    )  # fmt: skip
    report["comparison"] = comparison
    regressions = [f"{m['metric']}: {m['baseline']} -> {m['now']}" for m in comparison["metrics"] if not m["ok"]] + [
        f"case {c} passed before and fails now" for c in comparison["newly_failing"]
    ]
    judged = judge_drop(baseline, report, max_judge_drop)
    if judged:
        regressions.append(judged)
    summary = report["summary"]
    failing = [
        f"{c['id']}: "
        + "; ".join(f"{k}: {v.get('detail', '')}"[:160] for k, v in c["properties"].items() if not v["passed"])
        for c in report["cases"]
        if not c["passed"]
    ]
    judge = [c["judge_score"] for c in report["cases"] if c.get("judge_score") is not None]
    evaluation = ReleaseEvaluation(
        cases=len(report["cases"]),
        passed=sum(1 for c in report["cases"] if c["passed"]),
        judge_mean=round(sum(judge) / len(judge), 4) if judge else None,
        cost_usd_mean=float((summary.get("cost_usd") or {}).get("mean") or 0.0),
        latency_p95_s=float((summary.get("latency_s") or {}).get("p95") or 0.0),
        failing=tuple(f[:300] for f in failing[:200]),
        against=against,
        regressions=tuple(r[:300] for r in regressions[:50]),
        verdict="fail" if regressions else "pass",
        at=time.time(),
        report=_trimmed(report),
    )
    return report, evaluation


def _judge_mean(report: dict[str, Any], ids: set[str]) -> float | None:
    scores = [c["judge_score"] for c in report["cases"] if c["id"] in ids and c.get("judge_score") is not None]
    return sum(scores) / len(scores) if scores else None


def judge_drop(baseline: dict[str, Any], report: dict[str, Any], max_drop: float) -> str:
    """The judge's mean score over the cases both reports judged, if it fell by more than
    ``max_drop`` (absolute): a regression a pass rate can hide (answers that still pass, worse)."""
    both = {c["id"] for c in baseline["cases"] if c.get("judge_score") is not None} & {
        c["id"] for c in report["cases"] if c.get("judge_score") is not None
    }
    was, now = _judge_mean(baseline, both), _judge_mean(report, both)
    if was is None or now is None or was - now <= max_drop + 1e-9:
        return ""
    return f"judge mean score: {was:.3f} -> {now:.3f} (more than {max_drop:g} lower)"


def _trimmed(report: dict[str, Any]) -> dict[str, Any]:
    """What a later comparison needs of a report (its cases' results, not their answers)."""
    keep = ("run_id", "dataset", "dataset_sha256", "summary")
    cases = [{k: v for k, v in c.items() if k not in ("answer", "events")} for c in report["cases"]]
    return {**{k: report[k] for k in keep if k in report}, "cases": cases}
