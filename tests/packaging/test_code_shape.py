"""The shape of the code holds what was won (issue 38): every package type-checked strictly, the
bus runtime small, no source file too long to hold in one's head. The limits are a ratchet: a
file named here may shrink, never grow, and leaves the list once it is short; a new long file
fails. ``python tests/packaging/code_shape.py`` prints the figures.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from mesh_testing.scripts import load_script

pytestmark = pytest.mark.unit
HERE = Path(__file__).resolve().parent


shape = load_script(HERE / "code_shape.py")
figures = cache(shape.figures)  # one parse of the repository for every test here

KIT_LINES = 2_500
"""The bus runtime (mesh_kit) at most, issue 38's figure: 5,508 lines before it, 3,149 after its
second step (the tenants' doors and quotas went to mesh_tenancy; stream and bucket reads and the
record accessors to mesh_durable), under 2,500 once hosting a service went to mesh_host (the
``Mesh`` facade, the process runtime, health, backing services). What is left is the bus:
connection, trust, fair consumer, pipeline, reply, settings, telemetry, KV."""

DATA_TABLES = {
    "libs/guardrails/mesh_guardrails/injection.py": "the injection detector's feature table (_FEATURES, ~850 lines)",
}
"""Long because of a table of data, not of logic: exempt from the file-length limit."""

STILL_LONG: dict[str, int] = {}
"""Files over the limit when it was set, each with the most lines it may have: split them (all were, in issue 38)."""


def test_every_package_is_type_checked_strictly():
    fig = figures()
    assert set(fig.packages) - set(fig.typed) == set(), "add the package to [tool.mypy] packages"


def test_the_bus_runtime_stays_small():
    lines = figures().packages["mesh_kit"]
    assert lines <= KIT_LINES, f"mesh_kit has {lines} lines (at most {KIT_LINES}): what is not the bus goes above it"


def test_no_source_file_grows_past_its_limit():
    long = dict(figures().long_files)
    new = {path: n for path, n in long.items() if path not in STILL_LONG and path not in DATA_TABLES}
    assert new == {}, f"over {shape.LONG_FILE} lines: split these files"
    grown = {path: (long[path], most) for path, most in STILL_LONG.items() if long.get(path, 0) > most}
    assert grown == {}, "(lines, most allowed): a long file may shrink, not grow"


def test_a_file_that_became_short_leaves_the_list():
    long = dict(figures().long_files)
    short = sorted(path for path in [*STILL_LONG, *DATA_TABLES] if path not in long)
    assert short == [], "no longer over the limit: remove from STILL_LONG (or DATA_TABLES)"


def test_every_exception_a_package_raises_has_the_package_root():
    """One root per package (``<package>.errors``): ``except`` it catches anything that package
    raises and nothing of another's. A package that raises none of its own has no errors module."""
    import importlib
    import inspect
    import pkgutil

    missing = []
    for name in figures().packages:
        pkg = importlib.import_module(name)
        modules = [name, *(m.name for m in pkgutil.walk_packages(pkg.__path__, f"{name}."))]
        own = [
            c
            for mod in modules
            if not mod.endswith("__main__")
            for c in vars(importlib.import_module(mod)).values()
            if inspect.isclass(c) and issubclass(c, BaseException) and c.__module__ == mod
        ]
        if not own:
            continue
        errors = importlib.import_module(f"{name}.errors")
        roots = [c for c in vars(errors).values() if inspect.isclass(c) and c.__module__ == errors.__name__]
        root = next(c for c in roots if not any(issubclass(c, r) for r in roots if r is not c))
        missing += [f"{c.__module__}.{c.__name__}" for c in own if not issubclass(c, root)]
    assert missing == [], "derive from the package's root in its errors module"
