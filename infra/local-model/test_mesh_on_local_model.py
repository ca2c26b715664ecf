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

And the demo's configuration (``make demo-local``: the scripted planner, the worker on SmolLM2 with
quoted answers): the task completes, its answer is sentences of the documents, each citing the
passage it came from, chosen by the model (serve.py's multiple choice, ``choose.py``).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest

from mesh_contracts.registry import open_body
from mesh_contracts.v1 import TaskCompleted, TaskFailed
from mesh_testing.chaos import ChaosMesh, report
from mesh_testing.infra import Infra, running_infra
from mesh_tool_executor.tools import Registry

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


def _mesh(infra: Infra, port: int, folder: Path, *, local_planner: bool, env: dict[str, str]) -> ChaosMesh:
    config = (HERE / "models.yaml").read_text().replace("${LOCAL_MODEL_PORT}", str(port))
    if local_planner:
        config = config.replace("  planner: [scripted]", "  planner: [smol, scripted]")
    (folder / "models.yaml").write_text(config)
    m = ChaosMesh(infra, env={**ENV, **env, "MESH_MODEL_CONFIG": str(folder / "models.yaml")})
    m.start()
    asyncio.run(m.ready())
    return m


@pytest.fixture(scope="module")
def mesh(infra: Infra, model_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosMesh]:
    m = _mesh(infra, model_port, tmp_path_factory.mktemp("gw"), local_planner=True, env={})
    yield m
    asyncio.run(m.stop())


@pytest.fixture(scope="module")
def demo(model_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Infra]:
    """A second mesh on its own broker, configured as ``make demo-local`` runs it."""
    with running_infra(["acme"], name="localdemo", ack_wait_s=5.0) as infra:
        m = _mesh(infra, model_port, tmp_path_factory.mktemp("demo"), local_planner=False,
                  env={"MESH_ANSWER_STYLE": "quoted"})  # fmt: skip
        try:
            yield infra
        finally:
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


async def test_the_demo_answers_with_sentences_of_the_documents_each_cited(demo: Infra) -> None:
    started = time.monotonic()
    async with demo.client("acme") as c:
        seen = await c.submit(GOAL, task_id="local-demo", timeout=900)
    out = seen.outcome
    assert isinstance(out, TaskCompleted), getattr(out, "reason", out)  # the checker passed it
    docs = HERE.parents[1] / "services" / "rag" / "mesh_rag" / "sample_docs"
    corpus = " ".join(" ".join(p.read_text().split()) for p in docs.glob("*.md"))
    parts = re.split(r"\s*\[([^\[\]\s]+)\]\s*", out.answer.strip())
    said = list(zip(parts[0::2], parts[1::2], strict=False))
    cited = {f"{c.doc_id}#{c.chunk_id}" for c in out.citations}
    assert said, out.answer
    for text, ref in said:
        assert text in corpus and ref in cited, (text, ref, cited)
    assert any(ref.startswith("durability.md#") for _, ref in said), out.answer
    usage = [open_body(m.subject, m.data) for m in await demo.stored("USAGE", "usage.v1.acme.local-demo.recorded")]
    assert {u["model"] for u in usage if u["agent"] == "worker"} == {"SmolLM2-135M-Instruct.Q4_1.gguf"}, usage
    report("local model demo", seconds=round(time.monotonic() - started, 1), answer=out.answer[:300])


def test_every_built_in_tool_can_be_called_by_the_local_model(model_port: int) -> None:
    """A forced call (what a compute or write step's first turn sends) to each tool comes back as a
    call whose arguments validate against the tool's schema: every schema makes a grammar that
    llama.cpp parses (send_email's ``[^@\\s]`` did not, and the server died with SIGSEGV)."""
    called: list[str] = []
    cut: list[str] = []
    for tool in Registry().catalogue().tools:
        spec = {"type": "function", "function": {"name": tool.name, "description": tool.description,
                                                 "parameters": tool.parameters}}  # fmt: skip
        body = {
            "messages": [{"role": "user", "content": f"Use {tool.name} for: 17 * 23, ops@acme.test, s1, notes"}],
            "tools": [spec],
            "tool_choice": "required",
            "max_tokens": 120,
        }
        reply = httpx.post(f"http://127.0.0.1:{model_port}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, (tool.name, reply.text[:300])
        message = reply.json()["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        if not calls:  # cut inside an argument (max_tokens, or the loop guard on "12.12.12..."): never a crash
            assert message["content"].startswith("<tool_call>"), (tool.name, message)
            cut.append(tool.name)
            continue
        assert calls[0]["function"]["name"] == tool.name
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), tool.parameters)
        called.append(tool.name)
    assert httpx.get(f"http://127.0.0.1:{model_port}/health", timeout=10).status_code == 200, "the server still runs"
    assert "calculator" in called, (called, cut)
    report("forced calls", called=called, cut=cut)
