"""Records other services read from key-value buckets are contracts: versioned, with committed
schemas held to the same compatibility rules as messages, and read through one accessor."""

from __future__ import annotations

import asyncio
import json

import pytest
from pydantic import ValidationError

from mesh_contracts import SERVICES, generate
from mesh_contracts.topology import BUCKETS
from mesh_contracts.v1.records import RECORDS, Evidence, StatusRecord, TaskRecord, ToolCatalogue
from mesh_contracts.v1.tenants import TenantRecord
from mesh_contracts.v1.tool_servers import TOOL_SERVER_RECORDS
from mesh_durable import records
from mesh_testing.memkv import MemoryKV


def test_every_record_names_a_provisioned_bucket_and_has_a_committed_schema():
    buckets = {b.name for b in BUCKETS}
    committed = {p.name for p in (generate.SCHEMAS / "v1").glob("record.*.json")}
    for r in (*RECORDS, TenantRecord, *TOOL_SERVER_RECORDS):
        assert r.bucket in buckets
        assert f"record.{r.name}.json" in committed
        schema = json.loads((generate.SCHEMAS / "v1" / f"record.{r.name}.json").read_text())
        writer = {
            "quotas": f"each of {', '.join(SERVICES)}, its own keys",
            "tools": "tool-executor",
            "toolservers": "tool-executor",
            "tenants": "",
        }.get(r.bucket, "planner")
        assert schema["x-bucket"] == r.bucket and schema["x-writer"] == writer
    task = json.loads((generate.SCHEMAS / "v1" / "record.task.json").read_text())
    assert set(task["x-readers"]) == {"tool-executor"}, "who may read what a task is about (its policy)"
    status = json.loads((generate.SCHEMAS / "v1" / "record.status.json").read_text())
    assert "budget" in status["x-readers"] and {"created_at", "limits", "labels"} <= set(status["properties"])


def test_a_breaking_change_to_a_record_is_caught_like_one_to_a_message():
    old = json.loads((generate.SCHEMAS / "v1" / "record.task.json").read_text())
    new = json.loads(json.dumps(old))
    del new["properties"]["goal"]
    new["properties"]["limits"] = {"type": "string"}
    new["required"] = [*new.get("required", []), "finished_at"]
    problems = generate.breaking_changes(old, new)
    assert any("goal: property removed" in p for p in problems)
    assert any("limits: type changed" in p for p in problems)
    assert any("finished_at: became required" in p for p in problems)


def test_the_accessors_read_what_the_planner_wrote_and_refuse_an_unknown_version():
    async def go() -> None:
        tasks, status, evidence = MemoryKV(), MemoryKV(), MemoryKV()
        assert await records.task_record(tasks, "acme", "t1") is None
        assert await records.task_status(status, "acme", "t1") is None
        await tasks.put(TaskRecord.key("acme", "t1"), TaskRecord(tenant="acme", task_id="t1", goal="g").to_bytes())
        await status.put("acme.t1", StatusRecord(status="halted", reason="by hand").to_bytes())
        await evidence.put(Evidence.key("acme", "t1", "s1", 1), Evidence().to_bytes())
        rec = await records.task_record(tasks, "acme", "t1")
        assert rec is not None and rec.goal == "g" and rec.record_version == 1
        halted = await records.task_status(status, "acme", "t1")
        assert halted is not None and (halted.status, halted.reason) == ("halted", "by hand")
        assert await records.evidence(evidence, "acme", "t1", "s1", 1) == Evidence()
        # A record written before records had a version reads as version 1.
        await tasks.put("acme.t0", json.dumps({"tenant": "acme", "task_id": "t0", "goal": "old"}).encode())
        old = await records.task_record(tasks, "acme", "t0")
        assert old is not None and old.record_version == 1
        # A version this reader does not know is refused, not misread.
        await tasks.put(
            "acme.t2", json.dumps({"tenant": "acme", "task_id": "t2", "goal": "g", "record_version": 2}).encode()
        )
        with pytest.raises(ValidationError, match="record_version"):
            await records.task_record(tasks, "acme", "t2")

    asyncio.run(go())


async def test_the_tool_catalogue_is_one_record_the_worker_and_the_planner_read():
    """One source for the catalogue: what the tool-executor publishes is what the worker offers
    models and what the planner's prompt lists, and a catalogue from before the record (a bare
    list) still reads."""
    from mesh_planner.drafts import tool_list
    from mesh_tool_executor.tools import Registry

    kv = MemoryKV()
    assert await records.tool_catalogue(kv) is None, "not written yet: the executor is starting"
    published = Registry().catalogue()
    await kv.put(ToolCatalogue.KEY, published.to_bytes())
    read = await records.tool_catalogue(kv)
    assert read == published and {"calculator", "send_email", "http_get"} <= set(read.by_name())
    listed = tool_list(read)
    assert listed.startswith("search_docs (retrieval") and all(t.name in listed for t in published.tools)
    await kv.put(ToolCatalogue.KEY, json.dumps([t.model_dump() for t in published.tools]).encode())
    assert await records.tool_catalogue(kv) == published
