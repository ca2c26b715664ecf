"""The edge (``services/edge``, the HTTP gateway) as its own process beside a test's mesh."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from mesh_testing.infra import Infra
from meshctl import local
from meshctl.edge import spawn_edge


@contextlib.contextmanager
def running_edge(infra: Infra) -> Iterator[str]:
    """The edge as ``meshctl edge start`` runs it, against ``infra`` (the home's dev issuer signs
    people in: ``meshctl.edge.user_token``); yields its base URL, stops it after."""
    proc = spawn_edge(infra.ids, infra.nats_url, local.free_port())
    try:
        yield f"http://127.0.0.1:{proc.http_port}"
    finally:
        local.stop([[proc]], 10.0)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def sse(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], opened: asyncio.Event | None = None
) -> AsyncIterator[tuple[str, str, Any]]:
    """(id, event, data) of each Server-Sent Event, as they arrive; ``opened`` is set once the
    answer's headers are in (the edge subscribes before it sends them: a task submitted after
    that misses nothing)."""
    async with http.stream("GET", url, headers=headers) as res:
        assert res.status_code == 200, await res.aread()
        assert res.headers["content-type"].startswith("text/event-stream")
        if opened is not None:
            opened.set()
        ev: dict[str, Any] = {"id": "", "event": "", "data": []}
        async for line in res.aiter_lines():
            if line == "":
                if ev["data"]:
                    yield ev["id"], ev["event"], json.loads("\n".join(ev["data"]))
                ev = {"id": "", "event": "", "data": []}
            elif not line.startswith(":"):
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "data":
                    ev["data"].append(value)
                elif field in ("id", "event"):
                    ev[field] = value


async def follow_and_submit(
    base: str,
    token: str,
    task_id: str,
    goal: str,
    seen: list[tuple[str, str, Any]] | None = None,
    policy: dict[str, Any] | None = None,
) -> list[tuple[str, str, Any]]:
    """Open the task's event stream, then submit it (as the example web app does); every event
    (appended to ``seen`` as they come)."""
    seen = [] if seen is None else seen
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as http:
        opened = asyncio.Event()

        async def reader() -> None:
            async for event in sse(http, f"/v1/tasks/{task_id}/events", bearer(token), opened):
                seen.append(event)

        follow = asyncio.create_task(reader())
        await asyncio.wait({follow, asyncio.ensure_future(opened.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if follow.done():  # it failed before it opened
            follow.result()
        res = await http.post(
            "/v1/tasks", json={"goal": goal, "task_id": task_id, "policy": policy or {}}, headers=bearer(token)
        )
        assert res.status_code == 202, res.text
        await asyncio.wait_for(follow, 60)
    return seen
