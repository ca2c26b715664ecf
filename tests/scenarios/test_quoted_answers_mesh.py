"""Quoted answers through the real mesh (``MESH_ANSWER_STYLE=quoted``, issue 46): a step that answers
from cited text chooses its sentences and the worker writes them out with their references, so
the answer says nothing the documents do not; a step with another tool to call is not quoted.

The scripted model makes the choice here (``mesh_llm.scripted._quote``); ``make test-local-model``
and ``make demo-local`` run the same path on SmolLM2-135M, where the local server makes it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh_contracts.v1 import TaskCompleted
from mesh_testing.chaos import ChaosMesh
from mesh_testing.infra import Infra, running_infra

pytestmark = pytest.mark.e2e
DOCS = Path(__file__).resolve().parents[2] / "services" / "rag" / "mesh_rag" / "sample_docs"
REF = re.compile(r"\s*\[([^\[\]#\s]+)#([^\[\]\s]+)\]\s*")


@pytest.fixture(scope="module")
def infra() -> Iterator[Infra]:
    with running_infra(["acme"], name="quoted", ack_wait_s=5.0) as infra:
        yield infra


@pytest.fixture(scope="module")
def mesh(infra) -> Iterator[ChaosMesh]:
    m = ChaosMesh(infra, env={"MESH_LOG_LEVEL": "WARNING", "MESH_ANSWER_STYLE": "quoted"})
    m.start()
    asyncio.run(m.ready())
    yield m
    asyncio.run(m.stop())


def _said(answer: str) -> list[tuple[str, str | None]]:
    """The answer's sentences, each with the ``doc#chunk`` written after it (or None)."""
    parts = REF.split(answer.strip())
    out = []
    for i in range(0, len(parts), 3):
        text = parts[i].strip()
        if text:
            out.append((text, f"{parts[i + 1]}#{parts[i + 2]}" if i + 1 < len(parts) else None))
    return out


def test_a_quoted_answer_says_only_what_the_documents_say_and_cites_each_sentence(infra, mesh):
    async def main():
        async with infra.client("acme") as c:
            return await c.submit("How does AgentMesh avoid duplicate side effects?", task_id="q-1", timeout=90)

    seen = asyncio.run(main())
    out = seen.outcome
    assert isinstance(out, TaskCompleted), out  # the checker passed it: grounded, cited, relevant
    said = _said(out.answer)
    corpus = " ".join(" ".join(p.read_text().split()) for p in DOCS.glob("*.md"))
    cited = {f"{c.doc_id}#{c.chunk_id}" for c in out.citations}
    assert said and len(said) <= 3
    for text, ref in said:
        assert text in corpus, f"not a sentence of the documents: {text!r}"
        assert ref in cited, f"{text!r} cites {ref}, which is not among the task's citations {cited}"
    assert "duplicate side effects" in said[0][0].lower(), "what answers the question comes first"
    streamed = "".join(t.text for t in seen.tokens if t.kind == "delta")
    assert streamed and "{" not in streamed and '"quotes"' not in streamed, "a client watches sentences, not JSON"
    assert said[0][0] in streamed


def test_a_step_with_a_tool_to_call_is_not_quoted_and_its_result_can_be(infra, mesh):
    async def main():
        async with infra.client("acme") as c:
            goal = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
            return await c.submit(goal, task_id="q-2", timeout=90)

    seen = asyncio.run(main())
    out = seen.outcome
    assert isinstance(out, TaskCompleted), getattr(out, "reason", out)
    calculated = [e for e in seen.events if e.stage == "tool.called" and "calculator" in e.message]
    assert calculated, "the compute step called its tool: a step with a tool to call is not quoted"
    assert "391" in out.answer, out.answer
    said = _said(out.answer)
    assert any(ref is None and "391" in text for text, ref in said), "the computed result is quoted without a reference"
    assert any(ref and ref.startswith("durability.md#") for _, ref in said), out.answer
