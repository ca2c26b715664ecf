"""Golden-dataset evaluation (``meshctl eval DATASET``) and judge calibration (``meshctl eval calibrate``).

A dataset is a JSONL file of cases (format: ``tests/golden/README.md``). Each case is submitted
to a running mesh as a tenant's task, followed to its outcome, and held to the properties its
``expect`` names; the run becomes a report (a JSON document) that can gate CI by itself (pass
rate) or against an earlier report (regressions).

Public API::

    load_dataset(path: str | Path) -> Dataset                 # DatasetError: file:line: field: why
    Dataset.select(*, tags=(), case_ids=()) -> Dataset
    async def run_dataset(
        dataset_path: str | Path | Dataset,
        *,
        home: Path | None = None,                 # mesh home: the tenants' client identities
        clients: dict[str, TenantClient] | None = None,  # or connected clients, one per tenant
        concurrency: int = 4,
        timeout_s: float = 120.0,
        progress: bool | TextIO = True,           # True: stderr; a stream: there; False: quiet
        tags: Sequence[str] = (),                 # only cases with one of these tags
        case_ids: Sequence[str] = (),             # only these cases
        nats_url: str | None = None,              # with ``home``: instead of the running mesh's
        run_id: str | None = None,                # default: 8 random hex digits
    ) -> dict                                      # the report
    Runner(mesh: Mesh, concurrency=4, timeout_s=120.0, progress=None, tty=None, run_id=..., grace_s=10.0)
        async run(dataset) -> list[dict]          # the report's case entries
    async def run_cases(dataset, runner) -> dict  # the report
    evaluate(case, outcome, *, step_ids=None, label=None) -> dict[str, {"passed", "detail"}]
    case_result(case, task_id, observed, *, timeout_s=None) -> dict
    summarize(cases) -> dict;  percentile(values, p) -> float | None;  gate_failures(report, *, min_pass_rate) -> list[str]
    compare(baseline, current, *, max_regression=0.0, max_cost_increase=0.25, max_latency_increase=None,
            baseline_path="") -> dict
    load_report(path) -> dict;  write_report(report, path) -> Path;  default_report_path() -> Path
    render_table(report) / render_summary(report) / render_comparison(comparison) / render_calibration(report) -> str
    load_calibration(path) -> (list[Labelled], sha256)
    calibration_stats(labels, verdicts, scores=None) -> dict
    async def calibrate(path, *, model=None, min_score=0.6, concurrency=4, judge=None) -> dict

Errors an operator can fix are ``EvalError`` (``DatasetError`` for the files), one line each.

``clients`` given: they must already be connected (``async with client``) and are not closed
here; ``home`` given instead: a client per tenant is opened from the home's identities and the
running mesh's NATS URL, and closed at the end. The part that talks to the mesh is the
``Mesh`` protocol (``ingest`` and ``submit``); ``Runner`` runs cases through any ``Mesh``, which
is how the unit tests drive it with a fake.

Percentiles are nearest-rank: the value at rank ``ceil(p/100 * n)`` of the sorted latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import hashlib
import json
import math
import os
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mesh_contracts import Contract
from mesh_contracts.base import ID_PATTERN
from mesh_contracts.v1 import (
    DOCUMENT_TYPES,
    TaskCompleted,
    TaskFailed,
    TaskLimits,
    TaskPolicy,
    TaskRejected,
)
from mesh_eval.errors import EvalError

if TYPE_CHECKING:
    from meshctl.client import TenantClient

FORMAT = 1
DEFAULT_CALIBRATION = "tests/golden/judge-calibration.jsonl"
MAX_DOCUMENT_BYTES = 4_400_000  # what one ingest message carries (meshctl.commands.tasks.INGEST_MAX_BYTES)
ANSWER_CHARS = 2000


class DatasetError(EvalError):
    """The dataset (or calibration) file is invalid: names the file, the line and the field."""


# --- dataset --------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expect(_Strict):
    """What a case's outcome is held to. Only the keys given become properties."""

    outcome: Literal["completed", "failed", "rejected"] = "completed"
    must_cite: tuple[str, ...] = ()
    must_contain: tuple[str, ...] = ()
    must_not_contain: tuple[str, ...] = ()
    max_cost_usd: float | None = Field(None, ge=0)
    max_steps: int | None = Field(None, ge=0)
    tool_calls: tuple[str, ...] = ()
    judge_min_score: float | None = Field(None, ge=0.0, le=1.0)
    reason_contains: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Expect:
        for name in self.model_fields_set:
            if getattr(self, name) is None:
                raise ValueError(f"{name}: null is not a value (leave the key out instead)")
        if self.must_cite and self.outcome != "completed":
            raise ValueError(f"must_cite needs outcome 'completed' (a {self.outcome} task has no citations)")
        if self.reason_contains and self.outcome == "completed":
            raise ValueError("reason_contains needs outcome 'failed' or 'rejected' (a completed task has no reason)")
        return self

    @property
    def keys(self) -> tuple[str, ...]:
        """The expect keys given in the dataset, in declaration order (``outcome`` not included)."""
        return tuple(k for k in type(self).model_fields if k in self.model_fields_set and k != "outcome")


class _InlineDocument(_Strict):
    name: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)


class _RawCase(_Strict):
    id: str = Field(min_length=1, max_length=128)
    tenant: str = Field(pattern=ID_PATTERN)
    goal: str = Field(min_length=1, max_length=10_000)
    documents: tuple[Any, ...] = ()
    """Paths (str) or inline documents (objects), checked one by one by ``_document``."""
    limits: dict[str, Any] = {}
    policy: dict[str, Any] = {}
    expect: Expect = Expect()
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Document:
    """One document to ingest into a tenant: a file, or an inline text (``path`` None)."""

    doc_id: str
    path: Path | None = None
    text: str | None = None

    @property
    def source(self) -> str:
        return str(self.path) if self.path is not None else f"inline:{hashlib.sha256(self.data()).hexdigest()}"

    def data(self) -> bytes:
        return self.path.read_bytes() if self.path is not None else (self.text or "").encode()


@dataclass(frozen=True)
class Case:
    id: str
    tenant: str
    goal: str
    line: int
    documents: tuple[Document, ...] = ()
    limits: TaskLimits = field(default_factory=TaskLimits)
    policy: TaskPolicy = field(default_factory=TaskPolicy)
    expect: Expect = field(default_factory=Expect)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    path: str
    """As given (what the report records)."""
    sha256: str
    cases: tuple[Case, ...]

    def select(self, *, tags: Sequence[str] = (), case_ids: Sequence[str] = ()) -> Dataset:
        """Only the cases having one of ``tags`` (if any given) and among ``case_ids`` (if any)."""
        known = {c.id for c in self.cases}
        unknown = [i for i in case_ids if i not in known]
        if unknown:
            raise DatasetError(f"{self.path}: no case with id {unknown[0]!r}")
        cases = [c for c in self.cases if (not tags or set(tags) & set(c.tags)) and (not case_ids or c.id in case_ids)]
        if not cases:
            what = " and ".join(
                ([f"tag(s) {', '.join(tags)}"] if tags else []) + ([f"id(s) {', '.join(case_ids)}"] if case_ids else [])
            )
            raise DatasetError(f"{self.path}: no case matches {what}")
        return Dataset(self.path, self.sha256, tuple(cases))

    def documents(self) -> dict[str, list[Document]]:
        """Per tenant, every document its cases name, each once (by doc id and source)."""
        out: dict[str, list[Document]] = {}
        for case in self.cases:
            mine = out.setdefault(case.tenant, [])
            for doc in case.documents:
                if doc not in mine:
                    mine.append(doc)
        return {t: docs for t, docs in out.items() if docs}

    @property
    def tenants(self) -> list[str]:
        return sorted({c.tenant for c in self.cases})


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<case>"


def _explain(exc: ValidationError, known: Mapping[str, Sequence[str]]) -> str:
    """One error as ``field: message``: an unknown key first (a typo explains a "missing" field
    too), with the closest known key."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(err["loc"])
    where = _loc(loc)
    if err["type"] == "extra_forbidden":
        parent = _loc(loc[:-1]) if len(loc) > 1 else ""
        choices = known.get(parent, ())
        close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f" (known: {', '.join(choices)})" if choices else "")
        msg = f"unknown field {where!r}{hint}"
    else:
        msg = f"{where}: {err['msg'].removeprefix('Value error, ').replace('a valid tuple', 'a list')}"
    more = exc.error_count() - 1
    return _one_line(msg + (f" (+{more} more error{'s' if more > 1 else ''})" if more else ""))


_KNOWN = {
    "": tuple(_RawCase.model_fields),
    "expect": tuple(Expect.model_fields),
    "limits": tuple(TaskLimits.model_fields),
    "policy": tuple(TaskPolicy.model_fields),
}


def _strict_value(model: type[BaseModel], raw: dict[str, Any], prefix: str) -> BaseModel:
    """``model`` from ``raw``, refusing keys it does not declare (the contracts accept extras)."""
    unknown = [k for k in raw if k not in model.model_fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], model.model_fields, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(model.model_fields)})"
        raise ValueError(f"unknown field '{prefix}.{unknown[0]}'{hint}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ValueError(f"{prefix}.{_loc(err['loc'])}: {err['msg']}") from None


def _inline_name(name: str) -> str:
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name or not p.name:
        raise ValueError(f"a document name is a relative path without '..': {name!r}")
    if p.suffix.lower() not in DOCUMENT_TYPES or p.suffix.lower() == ".pdf":
        kinds = " ".join(sorted(k for k in DOCUMENT_TYPES if k != ".pdf"))
        raise ValueError(f"an inline document's name ends in one of {kinds}: {name!r}")
    return p.as_posix()


def _files(spec: str, base: Path) -> list[Document]:
    path = (base / spec).resolve()
    if not path.exists():
        raise ValueError(f"no such file or directory: {spec} (resolved to {path})")
    if path.is_file():
        found = [(path.name, path)]
    else:
        found = [
            (f.relative_to(path).as_posix(), f)
            for f in sorted(path.rglob("*"))
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in DOCUMENT_TYPES
        ]
        if not found:
            raise ValueError(f"no supported document under {spec} (supported: {' '.join(sorted(DOCUMENT_TYPES))})")
    for _, f in found:
        if f.suffix.lower() not in DOCUMENT_TYPES:
            raise ValueError(
                f"unsupported document type {f.suffix or '(none)'!r} for {spec} "
                f"(supported: {' '.join(sorted(DOCUMENT_TYPES))})"
            )
        if f.stat().st_size > MAX_DOCUMENT_BYTES:
            raise ValueError(f"{spec} is {f.stat().st_size} bytes; one document may be at most {MAX_DOCUMENT_BYTES}")
    return [Document(doc_id, f) for doc_id, f in found]


def _document(spec: Any, base: Path) -> list[Document]:
    if isinstance(spec, str):
        return _files(spec, base)
    if not isinstance(spec, dict):
        raise ValueError(f"a document is a path or an object with name and text, not {type(spec).__name__}")
    try:
        inline = _InlineDocument.model_validate(spec)
    except ValidationError as exc:
        raise ValueError(_explain(exc, {"": tuple(_InlineDocument.model_fields)})) from None
    return [Document(_inline_name(inline.name), text=inline.text)]


def _json_lines(path: Path, shown: str, kind: str) -> tuple[bytes, list[tuple[int, dict[str, Any]]]]:
    if not path.exists():
        raise DatasetError(f"no such {kind} file: {shown}")
    if path.is_dir():
        raise DatasetError(f"{shown} is a directory, not a JSONL file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {shown}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{shown}: not UTF-8 text (byte {exc.start})") from None
    rows = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{shown}:{n}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{shown}:{n}: a line must be a JSON object, not {type(obj).__name__}")
        rows.append((n, obj))
    if not rows:
        raise DatasetError(f"{shown}: no cases (every line is blank or a // comment)")
    return data, rows


M = TypeVar("M", bound=BaseModel)


def _validated(rows: list[tuple[int, dict[str, Any]]], shown: str, model: type[M], known: Mapping[str, Sequence[str]]) -> Iterator[tuple[int, str, M]]:  # fmt: skip
    """Each row as ``model``, with the label its errors carry (file:line: case 'id'); a row that
    does not validate, or repeats an earlier id, is a ``DatasetError``."""
    seen: dict[str, int] = {}
    for n, obj in rows:
        label = f"{shown}:{n}" + (f": case {obj['id']!r}" if isinstance(obj.get("id"), str) else "")
        try:
            raw = model.model_validate(obj)
        except ValidationError as exc:
            raise DatasetError(f"{label}: {_explain(exc, known)}") from None
        rid = raw.id  # type: ignore[attr-defined]
        if rid in seen:
            raise DatasetError(f"{label}: duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = n
        yield n, label, raw


def load_dataset(path: str | Path) -> Dataset:
    """Read and validate a dataset; any problem is a ``DatasetError`` naming file, line and field."""
    shown = str(path)
    file = Path(path)
    data, rows = _json_lines(file, shown, "dataset")
    base = file.absolute().parent
    cases: list[Case] = []
    sources: dict[tuple[str, str], tuple[str, int]] = {}  # (tenant, doc id) -> (source, line)
    for n, label, raw in _validated(rows, shown, _RawCase, _KNOWN):
        try:
            limits = _strict_value(TaskLimits, raw.limits, "limits")
            policy = _strict_value(TaskPolicy, raw.policy, "policy")
        except ValueError as exc:
            raise DatasetError(f"{label}: {_one_line(str(exc))}") from None
        docs: list[Document] = []
        for i, spec in enumerate(raw.documents):
            try:
                docs += _document(spec, base)
            except ValueError as exc:
                raise DatasetError(f"{label}: documents[{i}]: {_one_line(str(exc))}") from None
        for doc in docs:
            first = sources.setdefault((raw.tenant, doc.doc_id), (doc.source, n))
            if first[0] != doc.source:
                raise DatasetError(
                    f"{label}: document {doc.doc_id!r} for tenant {raw.tenant} differs from the one on line "
                    f"{first[1]} (one doc id, one content per tenant)"
                )
        cases.append(
            Case(
                raw.id,
                raw.tenant,
                raw.goal,
                n,
                tuple(dict.fromkeys(docs)),
                limits,  # type: ignore[arg-type]
                policy,  # type: ignore[arg-type]
                raw.expect,
                raw.tags,
            )
        )
    return Dataset(shown, hashlib.sha256(data).hexdigest(), tuple(cases))


def task_id_for(run_id: str, case_id: str) -> str:
    """``ev-<run id>-<case id>`` within the id pattern; a case id that had to change (characters
    replaced, or cut to fit 64) gets a digest of itself appended, so ids stay distinct."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", case_id)
    tid = f"ev-{run_id}-{safe}"
    if safe != case_id or len(tid) > 64:
        tid = f"{tid[:55]}-{hashlib.sha256(case_id.encode()).hexdigest()[:8]}"
    assert re.match(ID_PATTERN, tid), tid
    return tid


# --- properties -----------------------------------------------------------------------------


def outcome_name(outcome: Contract | None) -> str:
    if isinstance(outcome, TaskCompleted):
        return "completed"
    if isinstance(outcome, TaskFailed):
        return "failed"
    if isinstance(outcome, TaskRejected):
        return "rejected"
    return "timeout" if outcome is None else type(outcome).__name__


def _prop(passed: bool, detail: str = "", *, skipped: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"passed": bool(passed), "detail": detail}
    if skipped:
        out["skipped"] = True
    return out


def _short(items: Sequence[str], limit: int = 4) -> str:
    shown = ", ".join(repr(s) for s in items[:limit])
    return shown + (f" (+{len(items) - limit})" if len(items) > limit else "") if items else "none"


def evaluate(
    case: Case, outcome: Contract | None, *, step_ids: Sequence[str] | None = None, label: str | None = None
) -> dict[str, dict[str, Any]]:
    """Property results for one case: ``outcome`` always, ``checker`` unless a failure is
    expected, and one per ``expect`` key given. ``label`` overrides the outcome's name (e.g.
    ``error``); ``step_ids`` are the distinct steps seen in progress events (None: unknown)."""
    exp = case.expect
    got = label or outcome_name(outcome)
    props: dict[str, dict[str, Any]] = {}
    reason = getattr(outcome, "reason", "") or ""
    props["outcome"] = _prop(
        got == exp.outcome,
        f"{got}" if got == exp.outcome else f"expected {exp.outcome}, got {got}" + (f": {reason}" if reason else ""),
    )
    completed = outcome if isinstance(outcome, TaskCompleted) else None
    done = completed is not None
    none = f"no outcome ({got})"
    if exp.outcome == "completed":
        if completed is not None:
            bad = [c for c in completed.checks if not c.passed]
            props["checker"] = _prop(
                not bad,
                f"{len(completed.checks)} check(s) passed"
                if not bad
                else "; ".join(f"{c.name}: {c.reason}" if c.reason else c.name for c in bad),
            )
        else:
            failing = [
                f"{c.name}: {c.reason}" if c.reason else c.name for c in getattr(outcome, "checks", ()) if not c.passed
            ]
            props["checker"] = _prop(False, f"{got}" + (f"; failed checks: {'; '.join(failing)}" if failing else ""))
    # The answer when an answer is expected, the reason when a failure is: an outcome of the other
    # kind has no text to hold to the expectation (its mismatch is the ``outcome`` property's).
    what = "answer" if exp.outcome == "completed" else "reason"
    has_text = done if exp.outcome == "completed" else isinstance(outcome, (TaskFailed, TaskRejected))
    text = completed.answer if completed is not None else reason
    for key in exp.keys:
        want = getattr(exp, key)
        if key == "must_cite":
            cited = list(dict.fromkeys(c.doc_id for c in completed.citations)) if completed is not None else []
            missing = [d for d in want if d not in cited]
            props[key] = _prop(
                done and not missing,
                f"no citations ({got})"
                if not done
                else (f"cited {_short(cited)}" if not missing else f"missing {_short(missing)}; cited {_short(cited)}"),
            )
        elif key in ("must_contain", "must_not_contain", "reason_contains"):
            if not has_text:
                props[key] = _prop(False, f"no {what} to check ({got})")
                continue
            low = text.lower()
            present = [s for s in want if s.lower() in low]
            absent = [s for s in want if s.lower() not in low]
            if key == "must_not_contain":
                props[key] = _prop(
                    not present, f"{what} has {_short(present)}" if present else f"{what} has none of {len(want)}"
                )
            else:
                props[key] = _prop(
                    not absent, f"{what} lacks {_short(absent)}" if absent else f"{what} has all {len(want)}"
                )
        elif key == "max_cost_usd":
            if outcome is None:
                props[key] = _prop(False, none)
                continue
            cost = _usage(outcome)["cost_usd"]
            props[key] = _prop(cost <= want, f"${cost:.6f} {'<=' if cost <= want else '>'} ${want:.6f}")
        elif key == "max_steps":
            if completed is not None:
                steps: int | None = completed.steps
            elif step_ids is not None and len(set(step_ids)) > 0:
                steps = len(set(step_ids))
            else:
                props[key] = _prop(True, f"skipped: step count unknown ({got})", skipped=True)
                continue
            props[key] = _prop(steps <= want, f"{steps} step(s) {'<=' if steps <= want else '>'} {want}")
        elif key == "tool_calls":
            used = list(getattr(outcome, "tools", ()) or ())
            missing = [t for t in want if t not in used]
            props[key] = _prop(
                outcome is not None and not missing,
                none
                if outcome is None
                else (f"missing {_short(missing)}; called {_short(used)}" if missing else f"called {_short(used)}"),
            )
        elif key == "judge_min_score":
            score = getattr(outcome, "judge_score", None)
            if score is None:
                props[key] = _prop(False, "the judge did not run" if outcome is not None else none)
            else:
                props[key] = _prop(score >= want, f"{score:.3f} {'>=' if score >= want else '<'} {want:g}")
    return props


def _usage(outcome: Contract | None) -> dict[str, Any]:
    u = getattr(outcome, "usage", None)
    if u is None:
        return {"cost_usd": 0.0, "input": 0, "output": 0}
    return {"cost_usd": float(u.cost_usd), "input": int(u.input_tokens), "output": int(u.output_tokens)}


@dataclass
class Observed:
    """What the mesh gave for one case."""

    outcome: Contract | None
    """``TaskCompleted`` / ``TaskFailed`` / ``TaskRejected``, or None: nothing within the timeout."""
    latency_s: float
    """Client-observed seconds from submission to outcome (to giving up, for a timeout)."""
    step_ids: Sequence[str] | None = None
    """Distinct step ids seen in progress events (None: not known)."""
    error: str = ""
    """Set when the submission itself failed (the case's outcome is then ``error``)."""


def case_result(case: Case, task_id: str, seen: Observed, *, timeout_s: float | None = None) -> dict[str, Any]:
    """The report entry of one case."""
    out = seen.outcome
    label = "error" if seen.error else outcome_name(out)
    props = evaluate(case, out, step_ids=seen.step_ids, label=label if seen.error else None)
    usage = _usage(out)
    if seen.error:
        reason = seen.error
    elif out is None:
        reason = f"no outcome within {timeout_s:g}s" if timeout_s else "no outcome"
    else:
        reason = getattr(out, "reason", "") or ""
    steps = out.steps if isinstance(out, TaskCompleted) else (len(set(seen.step_ids)) if seen.step_ids else None)
    return {
        "id": case.id,
        "tenant": case.tenant,
        "task_id": task_id,
        "tags": list(case.tags),
        "passed": all(p["passed"] for p in props.values()),
        "outcome": label,
        "reason": reason,
        "properties": props,
        "cost_usd": round(usage["cost_usd"], 10),
        "tokens": {"input": usage["input"], "output": usage["output"]},
        "latency_s": round(seen.latency_s, 3),
        "steps": steps,
        "tools": list(getattr(out, "tools", ()) or ()),
        "judge_score": getattr(out, "judge_score", None),
        "checks": [c.model_dump(mode="json") for c in getattr(out, "checks", ()) or ()],
        "prompt_versions": dict(getattr(out, "prompt_versions", {}) or {}),
        "answer": out.answer[:ANSWER_CHARS] if isinstance(out, TaskCompleted) else "",
    }


# --- aggregation ----------------------------------------------------------------------------


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
        raise EvalError(f"baseline report {path}: not JSON ({_one_line(str(exc))})") from None
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


# --- baseline comparison --------------------------------------------------------------------

_EPS = 1e-9


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
    b_sum = summarize([before[i] for i in common])
    n_sum = summarize([now[i] for i in common])
    warnings = []
    if baseline.get("dataset_sha256") != current.get("dataset_sha256"):
        warnings.append(
            f"the baseline ran another version of the dataset (sha256 {str(baseline.get('dataset_sha256'))[:12]} "
            f"vs {str(current.get('dataset_sha256'))[:12]}); comparing the {len(common)} case(s) both have, by id"
        )
    metrics: list[dict[str, Any]] = []

    def drop(name: str, was: float, is_: float) -> None:
        delta = is_ - was
        metrics.append(
            {
                "metric": name,
                "baseline": was,
                "now": is_,
                "delta": round(delta, 4),
                "ok": -delta <= max_regression + _EPS,
            }
        )

    def rise(name: str, was: float | None, is_: float | None, limit: float) -> None:
        if was is None or is_ is None:
            metrics.append({"metric": name, "baseline": was, "now": is_, "delta": None, "ok": True})
            return
        rel: float | None
        if was > 0:
            rel = (is_ - was) / was
            ok = rel <= limit + _EPS
        else:
            rel, ok = (None, True) if is_ <= 0 else (math.inf, False)
        metrics.append(
            {"metric": name, "baseline": was, "now": is_, "delta": round(is_ - was, 8), "relative": rel, "ok": ok}
        )

    if common:
        drop("pass_rate", b_sum["pass_rate"], n_sum["pass_rate"])
        for prop in sorted(set(b_sum["properties"]) & set(n_sum["properties"])):
            drop(f"property {prop}", b_sum["properties"][prop]["rate"], n_sum["properties"][prop]["rate"])
        rise("mean cost_usd per case", b_sum["cost_usd"]["mean"], n_sum["cost_usd"]["mean"], max_cost_increase)
        if max_latency_increase is not None:
            rise("latency p95 s", b_sum["latency_s"]["p95"], n_sum["latency_s"]["p95"], max_latency_increase)
    for m in metrics:
        if isinstance(m.get("relative"), float) and math.isinf(m["relative"]):
            m["relative"] = "inf"
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


# --- rendering ------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = 0  # the last column runs free

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def render_table(report: dict[str, Any], *, detail_chars: int = 60) -> str:
    """The per-case table, then every failed case's failed properties in full."""
    rows, failures = [], []
    for c in report["cases"]:
        failed = [
            _cut(f"{name}: {p['detail']}", detail_chars) for name, p in c["properties"].items() if not p["passed"]
        ]
        if not c["passed"]:
            failures.append(f"{c['id']} ({c['task_id']}, {c['outcome']}):")
            failures += [f"  {name}: {p['detail']}" for name, p in c["properties"].items() if not p["passed"]]
        rows.append(
            (
                c["id"],
                c["outcome"],
                "PASS" if c["passed"] else "FAIL",
                f"{c['cost_usd']:.4f}",
                str(c["tokens"]["input"] + c["tokens"]["output"]),
                _num(c.get("latency_s"), ".2f"),
                _num(c.get("judge_score"), ".2f"),
                "; ".join(failed),
            )
        )
    header = ("ID", "OUTCOME", "RESULT", "COST $", "TOKENS", "LATENCY S", "JUDGE", "FAILED PROPERTIES")
    lines = _table(header, rows, right={3, 4, 5, 6})
    if failures:
        lines += ["", "failed cases:", *failures]
    return "\n".join(lines)


def render_summary(report: dict[str, Any]) -> str:
    s = report["summary"]
    lat, judge = s["latency_s"], s["judge_score"]
    versions = ", ".join(f"{role}={'|'.join(refs)}" for role, refs in report.get("prompt_versions", {}).items())
    return (
        f"pass rate {s['passed']}/{s['cases']} ({s['pass_rate'] * 100:.1f}%)  "
        f"latency p50 {_num(lat['p50'], '.2f')}s p95 {_num(lat['p95'], '.2f')}s  "
        f"cost ${s['cost_usd']['total']:.4f}  "
        f"judge mean {_num(judge['mean'], '.2f')} (n={judge['n']})  "
        f"prompts {versions or 'none reported'}"
    )


def render_comparison(comparison: dict[str, Any]) -> str:
    lines = [f"compared with baseline {comparison['baseline']} over {comparison['common_cases']} common case(s):"]
    lines += [f"  warning: {w}" for w in comparison["warnings"]]
    for m in comparison["metrics"]:
        rel = m.get("relative")
        rel_s = f" ({rel:+.1%})" if isinstance(rel, float) else (" (from 0)" if rel == "inf" else "")
        delta = "n/a" if m["delta"] is None else f"{m['delta']:+g}{rel_s}"
        lines.append(
            f"  {m['metric']:<32} {_num(m['baseline'], 'g'):>10} -> {_num(m['now'], 'g'):<10} "
            f"{delta:<20} {'OK' if m['ok'] else 'REGRESSION'}"
        )
    for i in comparison["newly_failing"]:
        lines.append(f"  case {i}: passed in the baseline, fails now  REGRESSION")
    for key, text in (
        ("newly_passing", "failed in the baseline, passes now"),
        ("missing_now", "in the baseline only (not compared)"),
        ("new_cases", "not in the baseline (not compared)"),
    ):
        if comparison[key]:
            lines.append(f"  {text}: {', '.join(comparison[key])}")
    lines.append(f"  {comparison['regressions']} regression(s)" if comparison["regressions"] else "  no regression")
    return "\n".join(lines)


class Progress:
    """Progress on a stream: one line redrawn in place on a terminal, one line per finished case
    otherwise (a CI log)."""

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO, *, tty: bool | None = None) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty() if tty is None else tty
        self.done = self.passed = 0
        self.started = time.monotonic()

    def line(self) -> str:
        filled = int(self.WIDTH * self.done / self.total) if self.total else self.WIDTH
        return (
            f"eval [{'#' * filled}{'-' * (self.WIDTH - filled)}] {self.done:>{len(str(self.total))}}/{self.total}  "
            f"passed {self.passed}  failed {self.done - self.passed}  elapsed {time.monotonic() - self.started:.0f}s"
        )

    def draw(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()

    def note(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.draw()

    def finished(self, entry: dict[str, Any]) -> None:
        self.done += 1
        self.passed += bool(entry["passed"])
        if self.tty:
            self.draw()
            return
        failed = [k for k, p in entry["properties"].items() if not p["passed"]]
        self.stream.write(
            f"[{self.done}/{self.total}] {entry['id']} {'PASS' if entry['passed'] else 'FAIL'} "
            f"{entry['latency_s']:.1f}s ${entry['cost_usd']:.4f}"
            + (f" {entry['outcome']}: {', '.join(failed)}" if failed else "")
            + "\n"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.draw()
            self.stream.write("\n")
            self.stream.flush()


# --- running --------------------------------------------------------------------------------


class Mesh(Protocol):
    """What the runner needs from a mesh."""

    async def ingest(self, tenant: str, documents: Sequence[tuple[str, Path]], timeout_s: float) -> None:
        """Ingest ``(doc id, file)`` pairs into ``tenant``; raise EvalError if one is not stored."""

    async def submit(self, case: Case, task_id: str, timeout_s: float) -> Observed:
        """Submit the case's task and follow it to its outcome (or ``timeout_s``)."""


@dataclass
class Runner:
    """Runs a dataset's cases through a ``Mesh``: documents first, then at most ``concurrency``
    tasks at a time; a case with no outcome after ``timeout_s`` (+ ``grace_s``, the time a
    client's last look at the stored outcome may take) is a ``timeout``."""

    mesh: Mesh
    concurrency: int = 4
    timeout_s: float = 120.0
    progress: TextIO | None = None
    tty: bool | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    grace_s: float = 10.0
    ingest_timeout_s: float = 120.0
    """Seconds to wait for each document (at least ``timeout_s``)."""

    async def ingest(self, dataset: Dataset, bar: Progress | None = None) -> None:
        by_tenant = dataset.documents()
        if not by_tenant:
            return
        count = sum(len(d) for d in by_tenant.values())
        if bar:
            bar.note(f"ingesting {count} document(s) into {len(by_tenant)} tenant(s): {', '.join(sorted(by_tenant))}")
        with tempfile.TemporaryDirectory(prefix="mesh-eval-") as tmp:
            pairs: dict[str, list[tuple[str, Path]]] = {}
            for tenant, docs in by_tenant.items():
                for n, doc in enumerate(docs):
                    path = doc.path
                    if path is None:  # inline: written out, so every document is ingested from a file
                        path = Path(tmp) / tenant / str(n) / doc.doc_id
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(doc.data())
                    pairs.setdefault(tenant, []).append((doc.doc_id, path))
            wait = max(self.timeout_s, self.ingest_timeout_s)
            await asyncio.gather(*(self.mesh.ingest(t, docs, wait) for t, docs in pairs.items()))

    async def run(self, dataset: Dataset) -> list[dict[str, Any]]:
        """Every case's report entry, in dataset order."""
        bar = Progress(len(dataset.cases), self.progress, tty=self.tty) if self.progress else None
        await self.ingest(dataset, bar)
        gate = asyncio.Semaphore(max(1, self.concurrency))
        ticker = asyncio.create_task(self._tick(bar)) if bar and bar.tty else None

        async def one(case: Case) -> dict[str, Any]:
            async with gate:
                tid = task_id_for(self.run_id, case.id)
                started = time.monotonic()
                try:
                    seen = await asyncio.wait_for(
                        self.mesh.submit(case, tid, self.timeout_s), self.timeout_s + self.grace_s
                    )
                except TimeoutError:
                    seen = Observed(None, time.monotonic() - started)
                except Exception as exc:  # noqa: BLE001 - one case's failure is its result, not the run's
                    seen = Observed(None, time.monotonic() - started, error=f"{type(exc).__name__}: {exc}")
                entry = case_result(case, tid, seen, timeout_s=self.timeout_s)
            if bar:
                bar.finished(entry)
            return entry

        try:
            if bar:
                bar.draw()
            return list(await asyncio.gather(*(one(c) for c in dataset.cases)))
        finally:
            if ticker:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            if bar:
                bar.close()

    @staticmethod
    async def _tick(bar: Progress) -> None:
        while True:
            await asyncio.sleep(1.0)
            bar.draw()


class ClientMesh:
    """The ``Mesh`` of connected tenant clients (one per tenant)."""

    def __init__(self, clients: dict[str, TenantClient], release: str = "") -> None:
        self.clients = clients
        self.release = release
        """A release of the tenant's behaviour every case runs (``meshctl release eval``)."""

    async def ingest(self, tenant: str, documents: Sequence[tuple[str, Path]], timeout_s: float) -> None:
        client = self.clients[tenant]
        for doc_id, path in documents:
            got = await client.ingest(doc_id, path.read_bytes(), DOCUMENT_TYPES[path.suffix.lower()], timeout=timeout_s)
            if got is None:
                raise EvalError(
                    f"ingest of {doc_id} into tenant {tenant}: no answer within {timeout_s:g}s "
                    "(is the rag service running?)"
                )
            if not got.ok:
                raise EvalError(f"ingest of {doc_id} into tenant {tenant} refused: {_one_line(got.error)}")

    async def submit(self, case: Case, task_id: str, timeout_s: float) -> Observed:
        client = self.clients[case.tenant]
        kw: dict[str, Any] = {"task_id": task_id, "limits": case.limits, "follow": True, "timeout": timeout_s}
        if self.release:
            kw["release"] = self.release
        seen = await client.submit(case.goal, policy=case.policy, **kw)
        latency = seen.latency_s if seen.outcome is not None else time.time() - seen.submitted_at
        # the plan's steps that were dispatched (budget events also name the planning call and the judge)
        steps = list(dict.fromkeys(e.step_id for e in seen.events if e.step_id and e.stage == "step.dispatched"))
        return Observed(seen.outcome, latency, steps or None)


def open_clients(home: Path, tenants: Sequence[str], *, nats_url: str | None = None) -> dict[str, TenantClient]:
    """A (not yet connected) client per tenant, from the home's identities; EvalError when the
    mesh is not running or a tenant has no client identity there."""
    from meshctl.client import TenantClient
    from meshctl.identity import Identities
    from meshctl.local import MeshState

    ids = Identities(home)
    for tenant in tenants:
        if not ids.creds(f"client.{tenant}").exists():
            known = ", ".join(ids.tenants()) or "none"
            raise EvalError(
                f"tenant {tenant!r} has no client identity in {home} (known: {known}); provision it with "
                f"meshctl up --tenants {','.join(sorted({*ids.tenants(), *tenants}))} (or meshctl init --tenants "
                "and restart the mesh)"
            )
    if nats_url is None:
        state = MeshState.load(home)
        if state is None or not any(n.alive() for n in state.nats):
            raise EvalError(
                f"no mesh is running from {home} (start one with: meshctl up --tenants {','.join(tenants)})"
            )
        nats_url = state.nats_url
    return {t: TenantClient.of(ids, nats_url, t) for t in tenants}


async def run_dataset(
    dataset_path: str | Path | Dataset,
    *,
    home: Path | None = None,
    clients: dict[str, TenantClient] | None = None,
    concurrency: int = 4,
    timeout_s: float = 120.0,
    progress: bool | TextIO = True,
    tags: Sequence[str] = (),
    case_ids: Sequence[str] = (),
    nats_url: str | None = None,
    run_id: str | None = None,
    release: str = "",
) -> dict[str, Any]:
    """Run a dataset against a running mesh and return the report (see the module docstring).
    ``release``: every case runs that release of its tenant's behaviour (the cases of one tenant)."""
    dataset = dataset_path if isinstance(dataset_path, Dataset) else load_dataset(dataset_path)
    if tags or case_ids:
        dataset = dataset.select(tags=tags, case_ids=case_ids)
    stream = (sys.stderr if progress is True else None) if isinstance(progress, bool) else progress
    async with contextlib.AsyncExitStack() as stack:
        if clients is None:
            if home is None:
                raise EvalError("run_dataset needs a mesh home or connected clients")
            opened = open_clients(home, dataset.tenants, nats_url=nats_url)
            clients = {t: await stack.enter_async_context(c) for t, c in opened.items()}
        missing = [t for t in dataset.tenants if t not in clients]
        if missing:
            raise EvalError(f"no client for tenant {missing[0]!r} (clients given for: {', '.join(clients) or 'none'})")
        runner = Runner(ClientMesh(clients, release), concurrency=concurrency, timeout_s=timeout_s, progress=stream)
        if run_id:
            runner.run_id = run_id
        return await run_cases(dataset, runner)


async def run_cases(dataset: Dataset, runner: Runner) -> dict[str, Any]:
    """Run ``dataset`` with ``runner`` and build its report."""
    started = datetime.now(UTC)
    cases = await runner.run(dataset)
    return build_report(
        dataset,
        cases,
        run_id=runner.run_id,
        started_at=started,
        finished_at=datetime.now(UTC),
        concurrency=runner.concurrency,
    )


# --- judge calibration ----------------------------------------------------------------------


class _RawLabelled(_Strict):
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
    data, rows = _json_lines(Path(path), shown, "calibration")
    out: list[Labelled] = []
    for n, _label, raw in _validated(rows, shown, _RawLabelled, {"": tuple(_RawLabelled.model_fields)}):
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
            raise EvalError(f"judge model configuration: {_one_line(str(exc))}") from None
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
                        "reasons": [_one_line(f"{type(exc).__name__}: {exc}")[:300]], "note": item.note,
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
    stats = calibration_stats(
        [r["label"] for r in results], [r["judge"] for r in results], [r["score"] for r in results]
    )
    models = sorted({r["model"] for r in results if r["model"]})
    versions = sorted({r["prompt_version"] for r in results if r["prompt_version"]})
    return {
        "format": FORMAT,
        "file": str(path),
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
        "cases": list(results),
    }


def render_calibration(report: dict[str, Any]) -> str:
    c, fd, ms, j = report["confusion"], report["fail_detection"], report["mean_score"], report["judge"]
    lines = [
        f"judge {j['model'] or '?'} (prompt {j['prompt_version'] or '?'}), min score {j['min_score']:g}, "
        f"{report['n']} labelled answer(s) from {report['file']}",
        f"agreement {_num(report['agreement'], '.3f')}  Cohen's kappa {_num(report['kappa'], '.3f')}",
        "confusion (rows: human label, columns: judge verdict)",
        f"  {'':<12}{'judge pass':>12}{'judge fail':>12}{'error':>8}",
    ]
    for lab in ("pass", "fail"):
        lines.append(f"  {'label ' + lab:<12}{c[lab]['pass']:>12}{c[lab]['fail']:>12}{c[lab]['error']:>8}")
    lines.append(
        f'detecting "fail": precision {_num(fd["precision"], ".3f")}  recall {_num(fd["recall"], ".3f")}  '
        f"F1 {_num(fd['f1'], '.3f')}  (support {fd['support']})"
    )
    lines.append(f"mean judge score: label pass {_num(ms['pass'], '.3f')}, label fail {_num(ms['fail'], '.3f')}")
    if report["disagreements"]:
        lines.append(f"disagreements ({len(report['disagreements'])}):")
        for d in report["disagreements"]:
            lines.append(
                f"  {d['id']}: label {d['label']}, judge {d['judge']} ({_num(d['score'], '.2f')}): "
                f"{d['reason'] or '-'}" + (f"  | human: {d['note']}" if d["note"] else "")
            )
    else:
        lines.append("no disagreement")
    return "\n".join(lines)
