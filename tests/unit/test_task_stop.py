"""``mesh_kit.tasks.stop`` ends a polling loop that a single cancel does not.

The loop below is the budget's horizon poll in miniature: a broker request whose cancellation
nats-py turns into an ordinary error (as it does once the connection is closed), caught as a
broker hiccup, then a sleep until the next poll. One ``cancel()`` that lands in the request is
lost, and ``await task`` waits forever: that hung a budget's stop in CI."""

from __future__ import annotations

import asyncio

import pytest

from mesh_kit import tasks

pytestmark = pytest.mark.unit


class ConnectionClosed(Exception):
    pass


async def _request(started: asyncio.Event) -> None:
    started.set()
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        raise ConnectionClosed("nats: connection closed") from None


async def _poll(started: asyncio.Event, polls: list[int]) -> None:
    while True:
        try:
            await _request(started)
        except Exception:  # a broker hiccup: poll again
            polls.append(1)
        await asyncio.sleep(0.05)


async def test_a_single_cancel_is_lost_in_the_request_and_stop_still_ends_the_loop():
    started, polls = asyncio.Event(), []
    task = asyncio.create_task(_poll(started, polls), name="horizon-poll")
    await started.wait()
    task.cancel()  # lands in the request: turned into an error, caught, and the loop goes on
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done and polls, "the plain cancel was swallowed (what hung the stop)"

    assert await tasks.stop(task, every_s=0.02) is True
    assert task.done() and task.cancelled()


async def test_stop_collects_a_failure_and_gives_up_on_a_task_that_never_ends(caplog):
    async def fails() -> None:
        raise RuntimeError("boom")

    failed = asyncio.create_task(fails())
    await asyncio.sleep(0)
    assert await tasks.stop(failed) is True  # its error is collected, not raised
    assert await tasks.stop(None) is True

    release = asyncio.Event()

    async def immortal() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass  # swallowed, every time

    task = asyncio.create_task(immortal(), name="immortal")
    await asyncio.sleep(0)
    assert await tasks.stop(task, every_s=0.01, give_up_s=0.1) is False
    assert "immortal did not stop" in caplog.text
    assert not task.done(), "left behind, not waited on for ever"
    release.set()  # the test's own cleanup
    task.cancel()
    await asyncio.wait({task}, timeout=1)
    assert task.done()
