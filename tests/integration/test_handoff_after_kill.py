"""A process killed -9 while it holds messages: its successor hands them back at once
(``mesh_host.handoff``), not after ``ack_wait`` (the rules of when it may: ``tests/unit/test_handoff.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator

import nats
import pytest
from integration_helpers import connect
from nats.js import api

from mesh_host.handoff import Journal, read
from mesh_kit.fair import FairConsumer, Fetched

pytestmark = pytest.mark.integration

ACK_WAIT_S = 120.0
"""Long: a message that comes back within the test's wait came back by the hand-off."""

HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    import nats
    from meshctl.identity import Identities
    from mesh_kit.fair import FairConsumer
    from mesh_host.handoff import Journal

    async def main(home, url, stream, path):
        nc = await nats.connect(url, **Identities(Path(home)).connect_options("admin"), max_reconnect_attempts=0)
        journal = Journal(path, %(ack)s)
        journal.take_over()

        async def forever(m):
            await asyncio.Event().wait()

        fair = FairConsumer(lambda: nc, stream, "d", "_INBOX", forever, workers=2, window=8, ack_wait_s=%(ack)s,
                            graceful_s=5, journal=journal)
        await fair.start()
        while len(fair.running) + len(fair.queue) < 5:
            await asyncio.sleep(0.05)
        print("holding", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main(*sys.argv[1:]))
    """
) % {"ack": ACK_WAIT_S}


@pytest.fixture
async def nc(integration_infra) -> AsyncIterator[nats.NATS]:
    async with connect(integration_infra, "admin") as conn:
        yield conn


async def _stream(nc: nats.NATS, name: str, n: int) -> None:
    js = nc.jetstream()
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(name)
    await js.add_stream(api.StreamConfig(name=name, subjects=[f"{name.lower()}.>"]))
    await js.add_consumer(
        name, api.ConsumerConfig(durable_name="d", ack_policy=api.AckPolicy.EXPLICIT, ack_wait=ACK_WAIT_S)
    )
    for i in range(n):
        await js.publish(f"{name.lower()}.v1.acme.t{i}.x", b"x")


async def _killed_holding(infra, stream: str, path: str) -> None:
    """A process that fetched and holds all five messages, killed -9."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, str(infra.ids.home), infra.nats_url, stream, path, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 60)
        assert line.strip() == b"holding", line
    finally:
        holder.send_signal(signal.SIGKILL)
        await holder.wait()


async def _take_all(nc: nats.NATS, stream: str, timeout: float) -> list[Fetched]:
    got: list[Fetched] = []

    async def take(m: Fetched) -> None:
        got.append(m)
        await m.ack()

    fair = FairConsumer(lambda: nc, stream, "d", "_INBOX", take, workers=4, window=8, ack_wait_s=ACK_WAIT_S,
                        graceful_s=5)  # fmt: skip
    await fair.start()
    try:
        deadline = time.monotonic() + timeout
        while len(got) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await fair.stop()
    return got


async def test_the_successor_of_a_killed_process_hands_back_what_it_held_at_once(integration_infra, nc, tmp_path):
    await _stream(nc, "HANDA", 5)
    path = str(tmp_path / "worker.held")
    await _killed_holding(integration_infra, "HANDA", path)
    assert len(read(path).held) == 5, "the dead process's file lists the five it held"
    info = await nc.jetstream().consumer_info("HANDA", "d")
    assert info.num_ack_pending == 5 and info.num_redelivered == 0

    successor = Journal(path, ACK_WAIT_S)
    replies = successor.take_over()
    assert len(replies) == 5
    for reply in replies:
        await nc.publish(reply, b"-NAK")
    got = await _take_all(nc, "HANDA", timeout=20)  # ack_wait is 120 s: only the hand-off brings them
    assert sorted(m.raw_message.subject for m in got) == [f"handa.v1.acme.t{i}.x" for i in range(5)]
    assert all(m.raw_message.metadata.num_delivered == 2 for m in got), "each once more, not twice"
    assert read(path).held == [], "the successor's own journal starts empty"
    successor.close()


async def test_a_message_is_listed_the_moment_it_arrives_not_when_fetch_returns_it(integration_infra, nc, tmp_path):
    """Messages the server sent that no ``fetch`` has returned yet (a busy pull waiting to fill its
    batch; a pull request that outlived its ``fetch``, here asked by hand while the consumer's
    window is full) are listed too: a process killed then holds them as much as the others."""
    await _stream(nc, "HANDC", 5)
    path = str(tmp_path / "worker.held")
    journal = Journal(path, ACK_WAIT_S)
    journal.take_over()

    async def forever(m: Fetched) -> None:
        await asyncio.Event().wait()

    fair = FairConsumer(lambda: nc, "HANDC", "d", "_INBOX", forever, workers=2, window=2, ack_wait_s=ACK_WAIT_S,
                        graceful_s=0.1, journal=journal)  # fmt: skip
    await fair.start()
    try:
        deadline = time.monotonic() + 20
        while len(fair.running) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(fair.running) == 2 and len(read(path).held) == 2, "its window is full: it fetches no more"
        # A pull request whose answer no fetch waits for: the three others are sent to the inbox.
        await nc.publish("$JS.API.CONSUMER.MSG.NEXT.HANDC.d", b'{"batch": 3, "no_wait": true}',
                         reply=fair._psub._sub.subject)  # fmt: skip
        while len(read(path).held) < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        held = read(path).held
        assert len(held) == 5, f"all five it was sent are listed, not only the two it took: {held}"
        assert len(fair.running) == 2, "the three wait in the client's queue, untaken"
    finally:
        for task in list(fair.running):
            task.cancel()
        await fair.stop()
        journal.close()
