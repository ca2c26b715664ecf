"""The shape of the code, measured: what issue 38 asks to keep small, in figures.

Run ``python tests/packaging/code_shape.py`` for the table (before/after figures of a
restructuring); ``test_code_shape.py`` holds the limits.

Counted: the Python source of every package (``contracts/``, ``libs/*``, ``services/*``), not
tests. The scripts beside them (``bench/``, ``infra/``, ``examples/``) are held to the same
file and function lengths but not counted in the packages' lines. A line is a physical line of
the file.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LONG_FILE = 600
"""A source file over this many lines is too long to hold in one's head (data tables aside)."""
LONG_FUNCTION = 80


@dataclass
class Package:
    name: str  # the import name (mesh_kit)
    root: Path  # the folder that holds it (libs/kit)
    files: dict[Path, int] = field(default_factory=dict)  # path -> lines

    @property
    def lines(self) -> int:
        return sum(self.files.values())


def packages() -> list[Package]:
    """Every package of the repository with its source files (tests and generated files left out)."""
    found: list[Package] = []
    for folder in [ROOT / "contracts", *sorted((ROOT / "libs").iterdir()), *sorted((ROOT / "services").iterdir())]:
        for pkg in sorted(folder.iterdir()):
            if not (pkg / "__init__.py").is_file():
                continue
            p = Package(pkg.name, folder)
            for f in sorted(pkg.rglob("*.py")):
                if "egg-info" in str(f) or "/tests/" in str(f):
                    continue
                p.files[f] = len(f.read_text(encoding="utf-8").splitlines())
            found.append(p)
    return found


SCRIPT_DIRS = ("bench", "infra", "examples")


def scripts() -> dict[Path, int]:
    """The Python scripts beside the packages (benchmarks, infra tools, examples), with their lines."""
    return {
        f: len(f.read_text(encoding="utf-8").splitlines())
        for d in SCRIPT_DIRS
        if (ROOT / d).is_dir()
        for f in sorted((ROOT / d).rglob("*.py"))
        if "/.venv" not in str(f) and "/node_modules/" not in str(f)
    }


def long_functions(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines) of every function longer than LONG_FUNCTION lines."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (child.end_lineno or child.lineno) - child.lineno + 1
                if n > LONG_FUNCTION:
                    out.append((f"{prefix}{child.name}", n))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def strictly_typed() -> set[str]:
    """The packages ``make lint`` runs mypy strict on (pyproject's ``[tool.mypy] packages``)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["mypy"]
    return set(config.get("packages", [])) if config.get("strict") else set()


@dataclass
class Figures:
    packages: dict[str, int]  # import name -> lines
    files: int
    functions: int
    long_files: list[tuple[str, int]]  # (path, lines), longest first
    long_functions: list[tuple[str, str, int]]  # (path, qualified name, lines), longest first
    typed: list[str]  # packages under mypy strict

    @property
    def lines(self) -> int:
        return sum(self.packages.values())

    @property
    def typed_share(self) -> float:
        return sum(n for name, n in self.packages.items() if name in self.typed) / self.lines


def figures() -> Figures:
    pkgs = packages()
    trees = {f: ast.parse(f.read_text(encoding="utf-8")) for p in pkgs for f in p.files}
    beside = scripts()
    typed = strictly_typed()
    return Figures(
        packages={p.name: p.lines for p in pkgs},
        files=len(trees),
        functions=sum(
            isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) for t in trees.values() for node in ast.walk(t)
        ),
        long_files=sorted(
            (
                (str(f.relative_to(ROOT)), n)
                for f, n in [*((f, n) for p in pkgs for f, n in p.files.items()), *beside.items()]
                if n > LONG_FILE
            ),
            key=lambda x: -x[1],
        ),
        long_functions=sorted(
            ((str(f.relative_to(ROOT)), q, n) for f in [*trees, *beside] for q, n in long_functions(f)),
            key=lambda x: -x[2],
        ),
        typed=sorted(typed & {p.name for p in pkgs}),
    )


def main() -> int:
    fig = figures()
    print(f"{'package':<22}{'lines':>7}")
    for name, lines in sorted(fig.packages.items(), key=lambda x: -x[1]):
        print(f"{name:<22}{lines:>7}{'  (mypy strict)' if name in fig.typed else ''}")
    print(f"total: {fig.lines} lines in {fig.files} files, {fig.functions} functions")
    print(f"files over {LONG_FILE} lines: {len(fig.long_files)}")
    for path, n in fig.long_files:
        print(f"  {n:>5}  {path}")
    print(f"functions over {LONG_FUNCTION} lines: {len(fig.long_functions)}")
    for path, q, n in fig.long_functions:
        print(f"  {n:>5}  {path}:{q}")
    print(f"mypy strict: {len(fig.typed)} of {len(fig.packages)} packages, {fig.typed_share:.0%} of the lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
