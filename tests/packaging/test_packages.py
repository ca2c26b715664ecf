"""Each package of the repository stands on what it declares, and layering runs one way.

- Statically (fast): every import in a package's modules, including imports inside functions,
  resolves to the standard library, the package itself, a package it declares, or one that a
  declared package brings; a ``mesh-*`` package must be declared directly (that is the
  architecture: services -> libs -> contracts, no cycles).
- For real (slow, about a minute a package on two cores): the package alone, with exactly what
  it declares, is installed into a fresh virtual environment (pinned by constraints.txt, built
  from a copy of the sources) and every one of its modules is imported there.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest

from mesh_testing.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def _load_local_packages() -> ModuleType:
    """The images' resolver (``infra/images/local_packages.py``, a script, not a package): the
    one place that lists the repository's packages and follows their local dependencies."""
    return load_script(ROOT / "infra" / "images" / "local_packages.py")


LP = _load_local_packages()
_project = LP.project


@cache
def packages() -> dict[str, Path]:
    """Distribution name -> folder, for every package in the repository."""
    return dict(LP.local())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement(req: str) -> tuple[str, set[str], str]:
    """(name, extras, marker) of a requirement string."""
    req, _, marker = req.partition(";")
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", req)
    assert m, req
    extras = {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}
    return _norm(m.group(1)), extras, marker.strip()


def _applies(marker: str, extras: set[str]) -> bool:
    """Whether a dependency's marker holds here (a crude reading: extras and python/platform only)."""
    if not marker:
        return True
    found = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    if found:
        return bool({_norm(e) for e in found} & {_norm(e) for e in extras})
    try:
        from packaging.markers import Marker

        return Marker(marker).evaluate()
    except Exception:
        return True


@cache
def _requires(dist: str, extras: frozenset[str]) -> frozenset[tuple[str, frozenset[str]]]:
    try:
        reqs = md.requires(dist) or []
    except md.PackageNotFoundError:
        return frozenset()
    out = set()
    for r in reqs:
        name, ex, marker = _requirement(r)
        if _applies(marker, set(extras)):
            out.add((name, frozenset(ex)))
    return frozenset(out)


def declared(folder: Path) -> list[str]:
    """What a package declares: its dependencies and every extra's (an extra's module, such as the
    contracts' schema generator, imports what the extra names)."""
    project = _project(folder)["project"]
    return [
        *project.get("dependencies", []),
        *(r for rs in project.get("optional-dependencies", {}).values() for r in rs),
    ]


def extras(folder: Path) -> list[str]:
    return sorted(_project(folder)["project"].get("optional-dependencies", {}))


def closure(folder: Path) -> set[str]:
    """Every distribution a package brings with it: what it declares, transitively."""
    seen: set[str] = set()
    todo = [_requirement(r)[:2] for r in declared(folder)]
    while todo:
        name, extras = todo.pop()
        key = f"{name}[{','.join(sorted(extras))}]"
        if key in seen:
            continue
        seen.add(key)
        todo += [(n, set(e)) for n, e in _requires(name, frozenset(extras))]
    return {k.split("[")[0] for k in seen}


def _modules_dirs(folder: Path) -> list[Path]:
    found = _project(folder).get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    names = [n.rstrip("*") for n in found.get("include", [])]
    return [folder / n for n in names if (folder / n).is_dir()]


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (never run)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for n in ast.walk(sub):
                    lines.add(getattr(n, "lineno", -1))
    return lines


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import that runs."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    out = []
    for node in ast.walk(tree):
        if node.lineno in skip if hasattr(node, "lineno") else False:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


@cache
def _owners() -> dict[str, list[str]]:
    return {k: [_norm(d) for d in v] for k, v in md.packages_distributions().items()}


LOCAL = {_norm(n) for n in packages()}


@pytest.mark.parametrize("dist", sorted(packages()))
def test_every_import_is_declared(dist):
    folder = packages()[dist]
    declared_directly = {_requirement(r)[0] for r in declared(folder)}
    brought = closure(folder) | {_norm(dist)}
    own = {d.name for d in _modules_dirs(folder)}
    problems = []
    for module_dir in _modules_dirs(folder):
        for path in sorted(module_dir.rglob("*.py")):
            for line, top in imports(path):
                if top in sys.stdlib_module_names or top in own or top == "__future__":
                    continue
                owners = _owners().get(top)
                where = f"{path.relative_to(ROOT)}:{line}"
                if not owners:
                    problems.append(f"{where}: imports {top!r}, which no installed distribution provides")
                elif not set(owners) & brought:
                    problems.append(f"{where}: imports {top!r} ({owners[0]}), which {dist} does not declare")
                elif set(owners) & LOCAL and not set(owners) & (declared_directly | {_norm(dist)}):
                    problems.append(f"{where}: imports {top!r} ({owners[0]}): declare it directly in {dist}")
    assert not problems, "\n".join(problems)


def test_layering_runs_one_way():
    """services -> libs -> contracts: no library declares a service (but the evaluation package,
    which runs the checker's judge), no service another (but the A2A gateway the edge) and the
    package graph has no cycle."""
    graph = {
        _norm(d): {r[0] for r in map(_requirement, _project(f)["project"].get("dependencies", [])) if r[0] in LOCAL}
        for d, f in packages().items()
    }
    tier = {_norm(d): f.parent.name if f.parent != ROOT else f.name for d, f in packages().items()}
    for d, deps in graph.items():
        for dep in deps:
            if tier[d] == "contracts":
                raise AssertionError(f"contracts depends on {dep}")
            if tier[d] == "libs" and tier[dep] == "services":
                raise AssertionError(f"{d} (a library) depends on the service {dep}")
            # (the A2A gateway is built on the edge's sign-in, tenant identities and follower: two
            # gateways of one kind, issue 48; no mesh service depends on another)
            if tier[d] == "services" and tier[dep] == "services" and (d, dep) != ("mesh-a2a", "mesh-edge"):
                raise AssertionError(f"{d} depends on another service, {dep}")

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert node not in path, "cycle: " + " -> ".join((*path, node))
        for dep in graph[node]:
            visit(dep, (*path, node))

    for node in graph:
        visit(node, ())


# --- installed alone, for real -------------------------------------------------------------------


async def _install_and_import(dist: str, tmp: Path) -> str:
    """'' when ``dist`` installs alone and every module imports; otherwise what went wrong."""
    folder = packages()[dist]
    src = tmp / "src"
    copies = []
    for f in LP.closure(folder):  # a copy: a build must not leave build/ in the repository
        dest = src / f.relative_to(ROOT)
        shutil.copytree(f, dest, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        copies.append(str(dest) + (f"[{','.join(extras(f))}]" if f == folder and extras(f) else ""))
    venv = tmp / "venv"
    py = venv / "bin" / "python"
    modules = sorted(
        ".".join(p.relative_to(folder).with_suffix("").parts).removesuffix(".__init__")
        for d in _modules_dirs(folder)
        for p in d.rglob("*.py")
        if p.name != "__main__.py"
    )
    no_deps = _project(folder).get("tool", {}).get("agentmesh", {}).get("install-no-deps", [])
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c", str(ROOT / "constraints.txt")]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "setuptools", "wheel"],
        [*pip, "--no-build-isolation", *copies],
        *([[*pip, "--no-deps", *no_deps]] if no_deps else []),
        [str(py), "-c", "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)", *modules],
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    for cmd in steps:
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=tmp, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            text = "\n".join(line for line in out.decode(errors="replace").splitlines() if "is ignored" not in line)
            return f"{dist}: `{' '.join(cmd[:4])} ...` failed:\n{text[-3000:]}"
    return ""


@pytest.mark.timeout(1200)
def test_each_package_installs_alone_in_a_fresh_venv_and_imports(tmp_path):
    async def run_all() -> list[str]:
        gate = asyncio.Semaphore(2)

        async def one(dist: str) -> str:
            async with gate:
                d = tmp_path / dist
                d.mkdir()
                return await _install_and_import(dist, d)

        return [r for r in await asyncio.gather(*(one(d) for d in sorted(packages()))) if r]

    failures = asyncio.run(run_all())
    assert not failures, "\n\n".join(failures)


def test_the_fresh_install_check_fails_on_an_undeclared_import(tmp_path):
    """The check above can fail: a package importing what it does not declare does not import."""
    fake = tmp_path / "repo" / "libs" / "liar"
    (fake / "mesh_liar").mkdir(parents=True)
    (fake / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=68"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "mesh-liar"\nversion = "0"\ndependencies = []\n'
        '[tool.setuptools.packages.find]\ninclude = ["mesh_liar*"]\n'
    )
    (fake / "mesh_liar" / "__init__.py").write_text("import nats  # not declared\n")
    global ROOT
    saved = ROOT
    packages.cache_clear()
    try:
        ROOT = LP.ROOT = tmp_path / "repo"
        shutil.copy(saved / "constraints.txt", ROOT / "constraints.txt")
        d = tmp_path / "work"
        d.mkdir()
        result = asyncio.run(_install_and_import("mesh-liar", d))
    finally:
        ROOT = LP.ROOT = saved
        packages.cache_clear()
    assert "No module named 'nats'" in result, result
    assert subprocess.run([sys.executable, "-c", "import nats"], check=False).returncode == 0, "nats is in our venv"
