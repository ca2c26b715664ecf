"""The supervisor's decisions on real processes, its clock given: a process that exits is started
again as itself, at once and then after a growing wait; more than ``MAX_RESTARTS`` restarts in
``WINDOW_S`` and it is left down; one that stayed up ``STEADY_S`` is restarted at once again.
(``tests/e2e/test_meshctl_lifecycle.py`` does the same to a whole mesh.)"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time

import pytest

from meshctl import local
from meshctl.identity import Identities
from meshctl.local import MeshState, Proc
from meshctl.supervisor import MAX_RESTARTS, STEADY_S, Supervisor, backoff, describe, last_line

pytestmark = pytest.mark.unit

FAILS = [sys.executable, "-c", "print('loading the key'); print('ValueError: not a key'); print(); raise SystemExit(3)"]
RUNS = [sys.executable, "-c", "import time; time.sleep(120)"]


def test_the_backoff_starts_at_once_doubles_from_half_a_second_and_is_capped():
    assert [backoff(n) for n in range(8)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_an_exit_is_told_by_its_signal_or_its_status(tmp_path):
    assert describe(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe(1) == "exited 1" and describe(0) == "exited 0"
    log = tmp_path / "x.log"
    log.write_text("a\n" + "x" * 10_000 + "\nlast words  \n\n")
    assert last_line(log) == "last words" and last_line(tmp_path / "none.log") == ""


def test_an_old_state_file_loads_and_a_save_replaces_it_whole(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    proc = {"name": "nats-server", "pid": 1, "argv": ["x"], "log": "l", "port": 1, "http_port": 2, "started": 3}
    old = {"home": str(tmp_path), "nats_url": "nats://x", "nats": [proc], "redis": None, "services": {}}
    (run / "state.json").write_text(json.dumps(old))  # written before the supervisor existed
    state = MeshState.load(tmp_path)
    assert state is not None and state.supervisor is None
    assert (state.nats[0].restarts, state.nats[0].last_exit, state.nats[0].state) == (0, "", "running")
    state.nats[0].restarts = 2
    state.save()
    assert os.listdir(run) == ["state.json"], "no temporary file left beside it"
    again = MeshState.load(tmp_path)
    assert again is not None and again.nats[0].restarts == 2


async def ended(sup: Supervisor, now: float) -> Proc:
    """Look (at ``now``) until the watched process's exit has been noted; that process (its
    restart, if it was due at once, is ``sup.state.redis`` then)."""
    first = sup.state.redis
    assert first is not None
    deadline = time.monotonic() + 30
    while first.state == "running":
        assert time.monotonic() < deadline, "the process did not exit"
        sup.check(now)
        await asyncio.sleep(0.01)
    return first


async def stop(sup: Supervisor) -> None:
    done = asyncio.Event()
    done.set()
    await sup.run(done)  # cancels its readiness watchers
    local.stop([[p for p in sup.state.procs()]], timeout=5)


async def test_a_process_that_keeps_failing_is_restarted_later_each_time_then_left_down(tmp_path, caplog):
    caplog.set_level(logging.INFO, "meshctl.supervisor")
    log = tmp_path / "redis-server.log"
    state = MeshState(home=str(tmp_path), redis=local.respawn(Proc("redis-server", 0, FAILS, str(log))))
    sup = Supervisor(state, Identities(tmp_path))
    now = time.monotonic()
    try:
        for n in range(MAX_RESTARTS):
            proc = await ended(sup, now)
            assert proc.last_exit == "exited 3: ValueError: not a key", "its status and its log's last line"
            wait = backoff(n)
            if wait:  # not before its time, then at once
                assert state.redis is proc and proc.state == "restarting" and not sup.check(now + wait - 0.01)
                now += wait
                assert sup.check(now)
            assert state.redis is not None and state.redis.state == "running" and state.redis.restarts == n + 1
            assert state.redis.argv == FAILS and state.redis.log == str(log), "started again as itself"
        proc = await ended(sup, now)
        assert proc.state == "crash-looping" and proc.restarts == MAX_RESTARTS
        assert not sup.check(now + 3600), "never started again"
        said = [r.getMessage() for r in caplog.records]
        waits = [m.split("; restarting it ")[1] for m in said if "; restarting it " in m]
        assert waits == ["now", "in 0.5 s", "in 1 s", "in 2 s", "in 4 s"]
        assert f"{MAX_RESTARTS} restarts in 60 s: not starting it again (crash-looping" in said[-1]
        saved = MeshState.load(tmp_path)
        assert saved is None, "check decides; run saves (the state file is the caller's)"
    finally:
        await stop(sup)


async def test_a_process_that_stayed_up_is_restarted_at_once_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, "meshctl.supervisor")
    state = MeshState(home=str(tmp_path), redis=local.respawn(Proc("redis-server", 0, RUNS, str(tmp_path / "r.log"))))
    sup = Supervisor(state, Identities(tmp_path))
    sup.watch["redis-server"].ready = False  # it never answers (no port): every exit is its own failure
    now = time.monotonic()
    try:
        for at, wait in ((now, 0.0), (now + 1, 0.5), (now + 2, 1.0), (now + 3 + STEADY_S, 0.0)):
            assert state.redis is not None
            os.kill(state.redis.pid, signal.SIGKILL)
            proc = await ended(sup, at)
            assert proc.last_exit == "killed by SIGKILL"
            sup.check(at + wait)
            assert state.redis.state == "running" and state.redis.pid != proc.pid
        waits = [
            r.getMessage().split("; restarting it ")[1] for r in caplog.records if "restarting it" in r.getMessage()
        ]
        assert waits == ["now", "in 0.5 s", "in 1 s", "now"]
    finally:
        await stop(sup)


async def test_a_process_killed_while_serving_is_restarted_at_once_every_time_and_never_given_up(tmp_path, caplog):
    """kill -9 from outside after it was ready (an OOM kill, a chaos drill) is not a crash loop of
    its own: no backoff, not counted, however often it comes (a service killed every second comes
    back every second)."""
    caplog.set_level(logging.INFO, "meshctl.supervisor")
    port = local.free_port()
    argv = [local.find_binary("redis-server"), "--port", str(port), "--save", "", "--appendonly", "no"]
    state = MeshState(
        home=str(tmp_path), redis=local.respawn(Proc("redis-server", 0, argv, str(tmp_path / "r.log"), port=port))
    )
    sup = Supervisor(state, Identities(tmp_path))
    now = time.monotonic()
    try:
        for n in range(MAX_RESTARTS + 2):
            assert state.redis is not None
            deadline = time.monotonic() + 30
            while not sup.watch["redis-server"].ready:  # answering on its port again
                assert time.monotonic() < deadline, "the restarted redis-server never answered"
                await asyncio.sleep(0.02)
            os.kill(state.redis.pid, signal.SIGKILL)
            proc = await ended(sup, now)
            assert proc.last_exit == "killed by SIGKILL" and proc.state == "restarting"
            assert state.redis is not proc, "started again in the same look: no backoff"
            assert state.redis.state == "running" and state.redis.restarts == n + 1
        waits = [r.getMessage() for r in caplog.records if "restarting it" in r.getMessage()]
        assert len(waits) == MAX_RESTARTS + 2 and all(m.endswith("while serving; restarting it now") for m in waits)
    finally:
        await stop(sup)
