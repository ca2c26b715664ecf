"""Which of the repository's packages an image installs: the one named and, transitively, every
``mesh-*`` package it declares, as paths (so pip never looks a mesh name up on an index).

    python infra/images/local_packages.py services/worker          # paths, dependencies first
    python infra/images/local_packages.py services/rag --no-deps   # what it installs without dependencies

A service's ``[tool.agentmesh] install-no-deps`` lists packages installed with ``--no-deps`` (rag's
embedding model, whose declared PyTorch stack the service does not use). Standard library only:
it runs in the image's build stage before anything is installed.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLACES = ("contracts", "libs/*", "services/*")


def project(path: Path) -> dict:
    return tomllib.loads((path / "pyproject.toml").read_text())


def local() -> dict[str, Path]:
    """Distribution name -> its folder, for every package in the repository."""
    out = {}
    for pattern in PLACES:
        for folder in sorted(ROOT.glob(pattern)):
            if (folder / "pyproject.toml").is_file():
                out[project(folder)["project"]["name"]] = folder
    return out


def requirement_name(requirement: str) -> str:
    """The distribution a requirement names (``redis>=5`` -> ``redis``)."""
    for stop in "<>=!~[; ":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip()


def closure(folder: Path) -> list[Path]:
    """``folder`` and the local packages it needs, dependencies before dependents."""
    packages, seen, order = local(), set(), []

    def visit(path: Path) -> None:
        if path in seen:
            return
        seen.add(path)
        for req in project(path)["project"].get("dependencies", []):
            if (dep := packages.get(requirement_name(req))) is not None:
                visit(dep)
        order.append(path)

    visit(folder.resolve())
    return order


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print("usage: local_packages.py FOLDER [--no-deps]", file=sys.stderr)
        return 2
    folder = (Path.cwd() / argv[0]).resolve()
    if not (folder / "pyproject.toml").is_file():
        print(f"local_packages.py: {argv[0]} has no pyproject.toml", file=sys.stderr)
        return 2
    if "--no-deps" in argv[1:]:
        print(" ".join(project(folder).get("tool", {}).get("agentmesh", {}).get("install-no-deps", [])))
    else:
        print(" ".join("./" + str(p.relative_to(ROOT)) for p in closure(folder)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
