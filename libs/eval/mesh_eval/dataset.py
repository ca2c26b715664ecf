"""A golden dataset: a JSONL file of cases (format: ``tests/golden/README.md``), each a tenant's
goal, the documents to ingest into the tenant first, the task's limits and policy, and what its
outcome is held to (``expect``). Loading checks everything a run would trip on later (unknown
keys, documents that are missing, too big or of an unknown type, one doc id with two contents in
one tenant) and says what is wrong in one line: file, line, case and field.

Public API::

    load_dataset(path: str | Path) -> Dataset                 # DatasetError: file:line: field: why
    Dataset.select(*, tags=(), case_ids=()) -> Dataset
    Dataset.documents() -> {tenant: [Document]};  Dataset.tenants -> [tenant]
    Case, Expect (expect.keys: the keys given), Document
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from mesh_contracts.base import ID_PATTERN
from mesh_contracts.v1 import DOCUMENT_TYPES, TaskLimits, TaskPolicy
from mesh_eval.errors import one_line
from mesh_eval.jsonl import DatasetError, Strict, explain, field_path, json_lines, validated

MAX_DOCUMENT_BYTES = 4_400_000  # what one ingest message carries (meshctl.commands.tasks.INGEST_MAX_BYTES)


class Expect(Strict):
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


class _InlineDocument(Strict):
    name: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1)


class _RawCase(Strict):
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
        raise ValueError(f"{prefix}.{field_path(err['loc'])}: {err['msg']}") from None


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
        raise ValueError(explain(exc, {"": tuple(_InlineDocument.model_fields)})) from None
    return [Document(_inline_name(inline.name), text=inline.text)]


def load_dataset(path: str | Path) -> Dataset:
    """Read and validate a dataset; any problem is a ``DatasetError`` naming file, line and field."""
    shown = str(path)
    file = Path(path)
    data, rows = json_lines(file, shown, "dataset")
    base = file.absolute().parent
    cases: list[Case] = []
    sources: dict[tuple[str, str], tuple[str, int]] = {}  # (tenant, doc id) -> (source, line)
    for n, label, raw in validated(rows, shown, _RawCase, _KNOWN):
        try:
            limits = _strict_value(TaskLimits, raw.limits, "limits")
            policy = _strict_value(TaskPolicy, raw.policy, "policy")
        except ValueError as exc:
            raise DatasetError(f"{label}: {one_line(str(exc))}") from None
        docs: list[Document] = []
        for i, spec in enumerate(raw.documents):
            try:
                docs += _document(spec, base)
            except ValueError as exc:
                raise DatasetError(f"{label}: documents[{i}]: {one_line(str(exc))}") from None
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
