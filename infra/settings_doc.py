"""The settings tables in the READMEs, generated from the settings models.

Each table (variable, type, default, description) sits between ``<!-- settings:begin -->`` and
``<!-- settings:end -->`` in its README and is rendered from a settings class: the field's
environment variable, its type and constraints, its default and its docstring. The top-level
README has the common settings (``ServiceSettings``) once; a service's README has the fields its
class adds to them (for the planner, the worker and the checker, ``AgentSettings``' included).

    python infra/settings_doc.py write    # rewrite the tables
    python infra/settings_doc.py check    # exit 1, with a diff, when a table is out of date

Run from the repository root (``--root`` to run elsewhere); ``make lint`` runs ``check``. The
classes are named by import path: this is a development tool over the repository's packages.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from mesh_kit.settings import ServiceSettings

BEGIN = "<!-- settings:begin -->"
END = "<!-- settings:end -->"

TARGETS: dict[str, str] = {
    "README.md": "mesh_kit.settings:ServiceSettings",
    "services/planner/README.md": "mesh_planner.settings:PlannerSettings",
    "services/worker/README.md": "mesh_worker.settings:WorkerSettings",
    "services/checker/README.md": "mesh_checker.settings:CheckerSettings",
    "services/rag/README.md": "mesh_rag.settings:RagSettings",
    "services/tool-executor/README.md": "mesh_tool_executor.settings:ToolExecutorSettings",
    "services/budget/README.md": "mesh_budget.settings:BudgetSettings",
    "services/edge/README.md": "mesh_edge.settings:EdgeSettings",
    "services/a2a/README.md": "mesh_a2a.settings:A2aSettings",
}
"""README (relative to the repository root) -> the settings class its table is rendered from."""

_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
"""The constraints ``Field(gt=..., ...)`` puts in a field's metadata, and how a table shows them."""


def settings_class(spec: str) -> type[BaseSettings]:
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, BaseSettings) and hasattr(cls, "env_names")):
        raise TypeError(f"{spec} is not a settings class that names its variables (env_names)")
    return cls


def table(cls: type[BaseSettings]) -> str:
    """The markdown table of ``cls``'s fields (for a subclass of ``ServiceSettings``: the ones it
    adds; a service with settings of its own alone, as the edge: all of them)."""
    own = not issubclass(cls, ServiceSettings) or cls is ServiceSettings
    rows = [
        f"<!-- generated from {cls.__module__}.{cls.__qualname__} by `make settings-docs`: "
        "edit the field docstrings there, not this table -->",
        "| Variable | Type | Default | Description |",
        "|---|---|---|---|",
    ]
    for name, field in cls.model_fields.items():
        if not own and name in ServiceSettings.model_fields:
            continue
        names = cls.env_names(name)  # type: ignore[attr-defined]
        variable = f"`{names[0]}`" + "".join(f", else `{n}`" for n in names[1:])
        rows.append(f"| {variable} | {_type(field)} | {_default(field)} | {_cell(field.description or '')} |")
    return "\n".join(rows)


def _type(field: FieldInfo) -> str:
    text = _type_name(field.annotation)
    bounds = [
        f"{symbol} {_number(getattr(m, attr))}"
        for m in field.metadata
        for attr, symbol in _BOUNDS
        if getattr(m, attr, None) is not None
    ]
    return ", ".join([text, *bounds])


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is tuple:
        return f"JSON list of {_type_name(args[0])}"
    if annotation is Path:
        return "path"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "none"
    if value == "":
        return "empty"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return f"`{_number(value)}`"
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(_number(v) for v in value) + "]`"
    return f"`{value}`"


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


def render(readme: str, block: str, source: str = "README") -> str:
    """``readme`` with the text between its markers replaced by ``block``."""
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{source}: no {BEGIN} ... {END} block")
    return readme[: start + len(BEGIN)] + "\n" + block + "\n" + readme[end:]


def _updates(root: Path) -> list[tuple[Path, str, str]]:
    """(path, current text, text with up-to-date tables) for every README."""
    out = []
    for rel, spec in TARGETS.items():
        path = root / rel
        current = path.read_text(encoding="utf-8")
        out.append((path, current, render(current, table(settings_class(spec)), rel)))
    return out


def check(root: Path) -> list[str]:
    """A unified diff per README whose table is out of date (empty: all up to date)."""
    return [
        "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(path), f"{path} (generated)"))
        for path, old, new in _updates(root)
        if old != new
    ]


def write(root: Path) -> list[Path]:
    """Rewrite the out-of-date tables; the READMEs changed."""
    changed = []
    for path, old, new in _updates(root):
        if old != new:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python infra/settings_doc.py", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("write", "check"))
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository root (default: here)")
    args = parser.parse_args(argv)
    try:
        if args.action == "write":
            for path in write(args.root):
                print(f"wrote {path}")
            return 0
        stale = check(args.root)
    except (OSError, ValueError) as exc:
        print(f"settings_doc: {exc}", file=sys.stderr)
        return 1
    for diff in stale:
        print(diff, end="" if diff.endswith("\n") else "\n")
    if stale:
        print(f"{len(stale)} settings table(s) out of date: run `make settings-docs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
