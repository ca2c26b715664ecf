"""Judge calibration (``meshctl eval calibrate``): the LLM judge the checker runs, asked about
answers a human labelled pass or fail (``tests/golden/judge-calibration.jsonl``, format:
``tests/golden/README.md``), and how well it agrees: agreement, Cohen's kappa, the confusion
matrix, its precision and recall at catching a "fail", and every disagreement with the human's
note. No mesh is needed: the judge runs here, with the gateway's configuration.

Public API::

    load_calibration(path) -> (list[Labelled], sha256)        # DatasetError: file:line: field: why
    calibration_stats(labels, verdicts, scores=None) -> dict
    async def calibrate(path, *, model=None, min_score=0.6, concurrency=4, judge=None) -> dict
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from mesh_eval.errors import EvalError, one_line
from mesh_eval.jsonl import Strict, json_lines, validated
from mesh_eval.report import _EPS, FORMAT, _mean, _r

DEFAULT_CALIBRATION = "tests/golden/judge-calibration.jsonl"


class _RawLabelled(Strict):
    id: str = Field(min_length=1, max_length=128)
    goal: str = Field(min_length=1)
    answer: str
    passages: tuple[str, ...] = ()
    rubric: str = ""
    label: Literal["pass", "fail"]
    note: str = ""


@dataclass(frozen=True)
class Labelled:
    """An answer a human labelled pass or fail."""

    id: str
    goal: str
    answer: str
    label: str
    line: int
    passages: tuple[str, ...] = ()
    rubric: str = ""
    note: str = ""


def load_calibration(path: str | Path) -> tuple[list[Labelled], str]:
    """The labelled answers and the file's sha256; DatasetError (file, line, field) if invalid."""
    shown = str(path)
    data, rows = json_lines(Path(path), shown, "calibration")
    out: list[Labelled] = []
    for n, _label, raw in validated(rows, shown, _RawLabelled, {"": tuple(_RawLabelled.model_fields)}):
        out.append(Labelled(raw.id, raw.goal, raw.answer, raw.label, n, raw.passages, raw.rubric, raw.note))
    return out, hashlib.sha256(data).hexdigest()


def calibration_stats(
    labels: Sequence[str], verdicts: Sequence[str], scores: Sequence[float | None] | None = None
) -> dict[str, Any]:
    """Agreement of the judge's verdicts ("pass" / "fail" / "error") with human labels.

    ``agreement`` is over every case (a judge error never agrees); the confusion matrix is
    label x verdict; Cohen's kappa and the judge's precision / recall / F1 at detecting "fail"
    are over the cases the judge answered. Kappa is None when it is undefined (both sides use one
    class only); a ratio with a zero denominator is None."""
    n = len(labels)
    confusion = {lab: {v: 0 for v in ("pass", "fail", "error")} for lab in ("pass", "fail")}
    for lab, v in zip(labels, verdicts, strict=True):
        confusion[lab][v] += 1
    agree = confusion["pass"]["pass"] + confusion["fail"]["fail"]
    judged = n - confusion["pass"]["error"] - confusion["fail"]["error"]
    kappa = None
    if judged:
        po = agree / judged
        label_p = {lab: (confusion[lab]["pass"] + confusion[lab]["fail"]) / judged for lab in ("pass", "fail")}
        judge_p = {v: (confusion["pass"][v] + confusion["fail"][v]) / judged for v in ("pass", "fail")}
        pe = sum(label_p[c] * judge_p[c] for c in ("pass", "fail"))
        kappa = None if abs(1 - pe) < _EPS else round((po - pe) / (1 - pe), 4)
    tp = confusion["fail"]["fail"]
    flagged = confusion["pass"]["fail"] + confusion["fail"]["fail"]
    actual = confusion["fail"]["pass"] + confusion["fail"]["fail"]
    precision = tp / flagged if flagged else None
    recall = tp / actual if actual else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall > 0
        else None
    )
    mean_score: dict[str, float | None] = {"pass": None, "fail": None}
    if scores is not None:
        for lab in ("pass", "fail"):
            got = [s for s, l_ in zip(scores, labels, strict=True) if l_ == lab and s is not None]
            mean_score[lab] = _r(_mean(got))
    return {
        "n": n,
        "judged": judged,
        "agreement": round(agree / n, 4) if n else None,
        "kappa": kappa,
        "confusion": confusion,
        "fail_detection": {"precision": _r(precision), "recall": _r(recall), "f1": _r(f1), "support": actual},
        "mean_score": mean_score,
    }


async def calibrate(
    path: str | Path,
    *,
    model: Any = None,
    min_score: float = 0.6,
    concurrency: int = 4,
    judge: Callable[..., Awaitable[Any]] | None = None,
) -> dict[str, Any]:
    """Judge every labelled answer in ``path`` with ``model`` (default: the configured gateway,
    ``mesh_llm.config.from_env()``, whose "judge" route answers) and report the agreement.
    Raises DatasetError for a bad file and EvalError (one line) without the mesh-judge package
    or for a bad model configuration (``mesh_llm.errors.ConfigError``)."""
    items, sha = load_calibration(path)
    try:
        from mesh_judge import JudgeInput, JudgePrompts, judge_with
        from mesh_llm.config import from_env
        from mesh_llm.errors import ConfigError
    except ImportError as exc:
        raise EvalError(f"eval calibrate needs the mesh-judge package (pip install -e libs/judge): {exc}") from None
    if model is None:
        try:
            model = from_env()
        except ConfigError as exc:
            raise EvalError(f"judge model configuration: {one_line(str(exc))}") from None
    if judge is None:
        # The judge prompts a checker runs with: a deployment's MESH_PROMPTS_DIR overrides them.
        judge_prompts = JudgePrompts.load(os.environ.get("MESH_PROMPTS_DIR") or None)
        judge = functools.partial(judge_with, judge_prompts=judge_prompts)
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(item: Labelled) -> dict[str, Any]:
        async with gate:
            inp = JudgeInput(item.goal, item.answer, item.rubric, item.passages)
            try:
                j = await judge(model, inp, min_score=min_score)
            except Exception as exc:  # noqa: BLE001 - a judge that cannot answer is that case's result
                return {"id": item.id, "label": item.label, "judge": "error", "score": None,
                        "reasons": [one_line(f"{type(exc).__name__}: {exc}")[:300]], "note": item.note,
                        "model": "", "prompt_version": ""}  # fmt: skip
        return {
            "id": item.id,
            "label": item.label,
            "judge": "pass" if j.passed else "fail",
            "score": j.score,
            "reasons": list(j.reasons),
            "note": item.note,
            "model": j.model,
            "prompt_version": j.prompt_version,
        }

    results = await asyncio.gather(*(one(i) for i in items))
    return _report(str(path), sha, list(results), min_score)


def _report(file: str, sha: str, results: list[dict[str, Any]], min_score: float) -> dict[str, Any]:
    """The calibration report: the file, the agreement figures, the judge, its disagreements and every case."""
    stats = calibration_stats(
        [r["label"] for r in results], [r["judge"] for r in results], [r["score"] for r in results]
    )
    models = sorted({r["model"] for r in results if r["model"]})
    versions = sorted({r["prompt_version"] for r in results if r["prompt_version"]})
    return {
        "format": FORMAT,
        "file": file,
        "file_sha256": sha,
        **stats,
        "judge": {"model": ", ".join(models), "prompt_version": ", ".join(versions), "min_score": min_score},
        "disagreements": [
            {
                "id": r["id"],
                "label": r["label"],
                "judge": r["judge"],
                "score": r["score"],
                "reason": r["reasons"][0] if r["reasons"] else "",
                "note": r["note"],
            }
            for r in results
            if r["judge"] != r["label"]
        ],
        "cases": results,
    }
