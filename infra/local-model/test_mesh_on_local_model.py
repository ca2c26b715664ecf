"""The mesh on a real local model: SmolLM2-135M behind serve.py, the planner and the worker on it.

Run by ``make test-local-model`` (which builds ``.venv-local-model`` first; not part of ``make
test``, which needs no compiler). What it holds, whatever the small model's answer is worth:

- the plan comes from the local model, held to the planner's schema (it parses and runs; no
  fallback to the scripted model);
- a research step retrieves before its first model turn, and its citations are recorded;
- every worker call is answered by the local model, streamed to the client, and none runs away
  (the loop guard ends each answer well before ``max_tokens``);
- the task ends with an outcome (completed, or failed by the checker with its reasons), not a
  timeout or a crash.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_contracts.registry import open_body
from mesh_contracts.v1 import TaskCompleted, TaskFailed
from mesh_testing.chaos import ChaosMesh, report
from mesh_testing.infra import Infra, running_infra

HERE = Path(__file__).resolve().parent
VENV = Path(__file__).resolve().parents[2] / ".venv-local-model"
GOAL = "How does AgentMesh avoid duplicate side effects?"
ENV = {"MESH_ACK_WAIT_S": "5", "MESH_LOG_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def model_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    python = VENV / "bin" / "python"
    assert python.exists(), f"{VENV} is missing: run `make test-local-model`, which builds it"
    port_file = tmp_path_factory.mktemp("model") / "port"
    server = subprocess.Popen(
        [str(python), str(HERE / "serve.py"), "--port", "0", "--port-file", str(port_file)],
        stdout=subprocess.DEVNULL,
        stderr=sys.stderr,
    )
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert port_file.exists(), f"serve.py did not start (exit {server.poll()})"
        yield int(port_file.read_text())
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme"], name="localmodel", ack_wait_s=5.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra: Infra, model_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosMesh]:
    config = (HERE / "models.yaml").read_text().replace("${LOCAL_MODEL_PORT}", str(model_port))
    config = config.replace("  planner: [scripted]", "  planner: [smol, scripted]")
    path = tmp_path_factory.mktemp("gw") / "models.yaml"
    path.write_text(config)
    m = ChaosMesh(infra, env={**ENV, "MESH_MODEL_CONFIG": str(path)})
    m.start()
    asyncio.run(m.ready())
    yield m
    asyncio.run(m.stop())


async def test_a_small_local_model_plans_and_works_a_task_through_the_mesh(infra: Infra, mesh: ChaosMesh) -> None:
    started = time.monotonic()
    async with infra.client("acme") as c:
        seen = await c.submit(GOAL, task_id="local-1", timeout=900)
    took = time.monotonic() - started
    out = seen.outcome
    assert isinstance(out, (TaskCompleted, TaskFailed)), out
    if isinstance(out, TaskFailed):
        assert out.reason.startswith("checker rejected the answer"), out.reason  # judged, not broken

    usage = [open_body(m.subject, m.data) for m in await infra.stored("USAGE", "usage.v1.acme.local-1.recorded")]
    served = {(u["agent"], u["provider"], u["model"], bool(u.get("error"))) for u in usage}
    local = "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ("planner", "openai", local, False) in served, served  # the plan is the local model's
    assert {(a, p) for a, p, _m, err in served if a in ("planner", "worker")} == {("planner", "openai"),
                                                                                ("worker", "openai")}, served  # fmt: skip
    kinds = [e.stage for e in seen.events]
    assert "plan.created" in kinds, kinds  # it parsed and passed the planner's checks
    worker_calls = [u for u in usage if u["agent"] == "worker"]
    assert worker_calls and all(u["output_tokens"] < 512 for u in worker_calls), [
        u["output_tokens"] for u in worker_calls
    ]
    streamed = [t for t in seen.tokens if t.kind == "delta"]
    assert streamed, "the local model's answers streamed to the client"
    retrieved = [e for e in seen.events if e.stage == "tool.called" and e.message.startswith("search_docs(")]
    report(
        "local model task",
        outcome=out.type,
        seconds=round(took, 1),
        steps=kinds.count("step.dispatched"),
        retrievals=len(retrieved),
        worker_output_tokens=[u["output_tokens"] for u in worker_calls],
        reason=getattr(out, "reason", "")[:200],
    )
