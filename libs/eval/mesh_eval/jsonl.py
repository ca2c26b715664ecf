"""The JSONL files mesh_eval reads (a golden dataset, the judge's calibration labels): one JSON object
a line, blank lines and ``//`` comments skipped, each object validated strictly (an unknown key is an
error naming the closest known one). Whatever is wrong is a ``DatasetError`` of one line, naming the
file, the line, the case and the field: ``ds.jsonl:4: case 'c1': unknown field 'expect.must_cit';
did you mean 'must_cite'?``.

Public API (for ``dataset`` and ``calibration``)::

    class Strict(BaseModel)                      # extra keys forbidden, frozen
    json_lines(path, shown, kind) -> (bytes, [(line, object)])
    validated(rows, shown, model, known) -> Iterator[(line, label, model)]   # label: file:line: case 'id'
    explain(exc: ValidationError, known) -> str  # one error as ``field: message``
    field_path(loc) -> str                       # ("expect", "must_cite", 0) -> expect.must_cite[0]
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from mesh_eval.errors import EvalError, one_line


class DatasetError(EvalError):
    """The dataset (or calibration) file is invalid: names the file, the line and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def field_path(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<case>"


def explain(exc: ValidationError, known: Mapping[str, Sequence[str]]) -> str:
    """One error as ``field: message``: an unknown key first (a typo explains a "missing" field
    too), with the closest known key."""
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = tuple(err["loc"])
    where = field_path(loc)
    if err["type"] == "extra_forbidden":
        parent = field_path(loc[:-1]) if len(loc) > 1 else ""
        choices = known.get(parent, ())
        close = difflib.get_close_matches(str(loc[-1]), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f" (known: {', '.join(choices)})" if choices else "")
        msg = f"unknown field {where!r}{hint}"
    else:
        msg = f"{where}: {err['msg'].removeprefix('Value error, ').replace('a valid tuple', 'a list')}"
    more = exc.error_count() - 1
    return one_line(msg + (f" (+{more} more error{'s' if more > 1 else ''})" if more else ""))


def json_lines(path: Path, shown: str, kind: str) -> tuple[bytes, list[tuple[int, dict[str, Any]]]]:
    """The file's bytes and its objects with their line numbers (``shown``: the path as given,
    ``kind``: what the file is, for "no such dataset file")."""
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


def validated(rows: list[tuple[int, dict[str, Any]]], shown: str, model: type[M], known: Mapping[str, Sequence[str]]) -> Iterator[tuple[int, str, M]]:  # fmt: skip
    """Each row as ``model``, with the label its errors carry (file:line: case 'id'); a row that
    does not validate, or repeats an earlier id, is a ``DatasetError``."""
    seen: dict[str, int] = {}
    for n, obj in rows:
        label = f"{shown}:{n}" + (f": case {obj['id']!r}" if isinstance(obj.get("id"), str) else "")
        try:
            raw = model.model_validate(obj)
        except ValidationError as exc:
            raise DatasetError(f"{label}: {explain(exc, known)}") from None
        rid = raw.id  # type: ignore[attr-defined]
        if rid in seen:
            raise DatasetError(f"{label}: duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = n
        yield n, label, raw
