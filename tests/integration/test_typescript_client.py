"""The TypeScript client (clients/typescript) against a real mesh: this module starts the mesh as
the scenarios do (``running_infra``, ``started``), installs and builds the package (``npm ci`` when
its dependencies are missing or older than its lockfile, ``npm run build`` every time: ``tsc`` takes
seconds), and runs its tests with node's own test runner, the home's identities and the broker's
address passed in the environment. Node 20.19+ and npm are required: without them this fails,
saying so, rather than skipping."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_testing.chaos import ChaosMesh, started
from mesh_testing.infra import Infra, running_infra

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "clients" / "typescript"
TENANT = "acme"
NODE_MIN = (20, 19)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not on PATH: the TypeScript client's tests need Node {'.'.join(map(str, NODE_MIN))}+ "
                    "and npm (e.g. apt-get install nodejs npm, or nodejs.org)", pytrace=False)  # fmt: skip
    return path


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=PACKAGE, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}", pytrace=False)
    return done


@pytest.fixture(scope="module")
def built() -> str:
    """The package installed and compiled; returns the path of ``node``."""
    node, npm = _tool("node"), _tool("npm")
    version = _run([node, "--version"]).stdout.strip()
    found = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if found < NODE_MIN:
        pytest.fail(f"node {version} is too old: the client needs {'.'.join(map(str, NODE_MIN))}+", pytrace=False)
    installed = PACKAGE / "node_modules" / ".package-lock.json"
    lock = PACKAGE / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        _run([npm, "ci", "--no-audit", "--no-fund"])
    _run([npm, "run", "build"])
    return node


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra([TENANT, "globex"], name="ts-client") as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosMesh]:
    config = tmp_path_factory.mktemp("models") / "models.json"
    config.write_text(json.dumps({  # each model call takes 100 ms: a task lasts long enough to lose sight of it
        "providers": {"slow": {"kind": "scripted", "latency_ms": 100}},
        "models": {"m": {"provider": "slow", "id": "scripted-1"}},
        "routes": {"default": ["m"]},
    }))  # fmt: skip
    with started(infra, {"MESH_MODEL_CONFIG": str(config), "MESH_LOG_LEVEL": "WARNING"}) as m:
        yield m


def test_the_typescript_client_against_a_real_mesh(built: str, infra: Infra, mesh: ChaosMesh) -> None:
    env = {
        **os.environ,
        "MESH_HOME": str(infra.home),
        "MESH_NATS_URL": infra.nats_url,
        "MESH_TENANT": TENANT,
        "MESH_SCHEMAS_DIR": str(ROOT / "contracts" / "schemas"),
    }
    tests = [str(PACKAGE / "dist" / "test" / f) for f in ("schemas.test.js", "mesh.test.js")]
    done = subprocess.run(
        [built, "--test", "--test-concurrency=1", "--test-reporter=spec", *tests],
        cwd=PACKAGE, env=env, capture_output=True, text=True, timeout=420,
    )  # fmt: skip
    print(done.stdout[-20000:])
    assert done.returncode == 0, f"node --test failed:\n{done.stdout[-20000:]}\n{done.stderr[-5000:]}"
    passed = re.search(r"ℹ pass (\d+)", done.stdout)
    failed = re.search(r"ℹ fail (\d+)", done.stdout)
    skipped = re.search(r"ℹ skipped (\d+)", done.stdout)
    assert passed and int(passed.group(1)) >= 12, done.stdout[-3000:]
    assert failed and int(failed.group(1)) == 0
    assert skipped and int(skipped.group(1)) == 0, "no test of the client may be skipped"
