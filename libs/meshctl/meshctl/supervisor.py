"""The supervisor of a local mesh: ``meshctl up`` keeps what it started alive.

``meshctl up`` (``start``) spawns ``python -m meshctl.supervisor`` in a session of its own and
waits for one JSON line on its stdout: ``{"ok": true}`` once the mesh is up, or
``{"ok": false, "error": ...}``. The supervisor runs ``local.up`` itself, so nats-server,
redis-server and the six services are its children: it learns how each one ended (exit status or
signal), which a process left to init would not tell. Then it polls them: one that exits is logged
(name, pid, how it ended, the last line of its log if it failed by itself) and started again as
itself (a service with the same name, environment and health port; nats-server and redis-server
with the same command: same ports, same store, same users), at once the first time, then after a
backoff while it keeps dying; more than ``MAX_RESTARTS`` restarts in ``WINDOW_S`` and it is left
down, marked ``crash-looping``, while everything else runs on. A process killed by a signal after
it was ready (kill -9, the OOM killer, a chaos drill) did not fail by itself: it is started again
at once every time, and such exits count toward neither the backoff nor the crash loop (a
service killed every second must come back every second, not be given up on). Every change is written to
``run/state.json`` (restarts, last exit, state) for ``meshctl status`` and ``top``.

SIGTERM (``meshctl down``) stops it restarting, stops everything as ``local.down`` does (services
first, then redis and nats), removes the state file and exits. Its log is
``<home>/logs/supervisor.log``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mesh_host.runtime import STANDBY
from meshctl import keeper, local, reaper, standby
from meshctl.identity import Identities
from meshctl.local import MeshError, MeshState, Proc

log = logging.getLogger("meshctl.supervisor")

MODULE = "meshctl.supervisor"  # run as ``python -m``: its ``__name__`` is then ``__main__``

POLL_S = 0.1
MAX_RESTARTS = 5
"""Restarts of one process allowed within ``WINDOW_S``; one more is a crash loop: it is left down."""
WINDOW_S = 60.0
STEADY_S = 30.0
"""Up this long, a process has recovered: its next exit is restarted at once again."""
BACKOFF_CAP_S = 10.0
MAX_SPARE_FAILURES = 3
"""Standbys of one service that may end while standing by before no more are started for it."""


def backoff(streak: int) -> float:
    """The wait before restarting a process that exited ``streak`` times in a row without staying
    up ``STEADY_S``: none the first time, then 0.5 s doubling up to ``BACKOFF_CAP_S``."""
    return 0.0 if streak == 0 else min(BACKOFF_CAP_S, 0.5 * 2 ** (streak - 1))


def describe(code: int) -> str:
    """``killed by SIGKILL`` or ``exited 1``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited {code}"


def last_line(path: str | Path) -> str:
    """The last non-empty line of a log file (its end only is read), or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class Watch:
    """What the supervisor keeps about one process beyond its ``Proc``."""

    since: float  # when it was started (monotonic)
    streak: int = 0  # exits in a row without staying up STEADY_S: the backoff's exponent
    recent: collections.deque[float] = field(default_factory=collections.deque)  # its restarts in WINDOW_S
    due: float | None = None  # when it is to be started again, while it waits out its backoff
    ready: bool = True  # it answered its readiness check since it was (re)started
    counted: bool = True  # its pending restart counts toward the crash loop


class Supervisor:
    """Restarts what exits among ``state``'s processes, and records it in ``state``."""

    def __init__(self, state: MeshState, ids: Identities, *, spares: bool = False) -> None:
        self.state = state
        self.ids = ids
        now = time.monotonic()
        self.watch = {p.name: Watch(now) for p in state.procs()}
        self.announcing: set[asyncio.Task[None]] = set()
        self.spares: dict[str, Proc | None] | None = (
            {p.service or p.name: None for p in state.services.values()} if spares else None
        )
        """With ``meshctl up --standby``: each service's warm standby (``meshctl.standby``)."""
        self.spare_failures: collections.Counter[str] = collections.Counter()
        self.forking = spares and reaper.become_subreaper()
        """A standby forks a copy per restart and stays (Linux), rather than being used up."""

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set; nothing is started again after that."""
        while not stop.is_set():
            if self.check(time.monotonic()):
                self.state.save()
            if self.forking:
                local.reap_strays()
            self.keep_spares()
            try:
                await asyncio.wait_for(stop.wait(), POLL_S)
            except TimeoutError:
                pass
        for task in self.announcing:
            task.cancel()
        await asyncio.gather(*self.announcing, return_exceptions=True)
        for spare in (self.spares or {}).values():
            if spare is not None:
                standby.stop(spare)

    def keep_spares(self) -> None:
        """A warm standby for every service that has none, once every process is ready (a
        standby's start must not take the CPU a recovering process needs)."""
        if self.spares is None or not all(w.ready and w.due is None for w in self.watch.values()):
            return
        for service, spare in self.spares.items():
            if spare is not None:
                code = local.returncode(spare)
                if code is None:
                    continue
                self.spare_failures[service] += 1  # it ended while it stood by: broken, or killed
                log.warning("the standby of %s (pid %d) %s%s", service, spare.pid, describe(code),
                            f": {line[:200]}" if (line := last_line(spare.log)) else "")  # fmt: skip
            if self.spare_failures[service] >= MAX_SPARE_FAILURES:
                if spare is not None:
                    log.error("no more standbys of %s: %d ended while standing by", service, MAX_SPARE_FAILURES)
                    self.spares[service] = None
                continue
            try:
                self.spares[service] = spare = standby.spawn(
                    self.ids, self.state.nats_url, service, forking=self.forking
                )
            except OSError as exc:
                log.warning("no standby of %s: %s", service, exc)
                self.spares[service] = None
                continue
            log.info("%s standing by (pid %d)", service, spare.pid)

    def _from_spare(self, old: Proc) -> Proc | None:
        """``old`` started again from its service's warm standby, if there is one alive: a copy
        of it (forking), or the standby itself."""
        service = old.service or old.name
        if self.spares is None or (spare := self.spares.get(service)) is None:
            return None
        if self.forking:
            return standby.fork(spare, self.ids, name=old.name, http_port=old.http_port, log_path=old.log)
        self.spares[service] = None
        return standby.activate(spare, self.ids, name=old.name, http_port=old.http_port, log_path=old.log)

    def check(self, now: float) -> bool:
        """One look at every process: note those that ended, start again those due. True if the
        state changed."""
        changed = False
        for proc in self.state.procs():
            w = self.watch[proc.name]
            if proc.state == "running":
                code = local.returncode(proc)
                if code is None:
                    continue
                why = describe(code)
                if code > 0 and (line := last_line(proc.log)):  # it failed by itself: its last word
                    why += f": {line[:200]}"
                self.ended(proc, w, why, now, killed=code < 0)
                changed = True
            if proc.state == "restarting" and w.due is not None and now >= w.due:
                self.restart(proc, w, now)
                changed = True
        return changed

    def ended(self, proc: Proc, w: Watch, why: str, now: float, *, killed: bool = False) -> None:
        """Log how ``proc`` ended and schedule its restart, or give it up (a crash loop)."""
        proc.last_exit = why
        if w.ready and killed:  # by a signal from outside, while it served
            w.streak, w.due, w.counted = 0, now, False
            proc.state = "restarting"
            log.warning("%s (pid %d) %s while serving; restarting it now", proc.name, proc.pid, why)
            return
        w.counted = True
        while w.recent and now - w.recent[0] > WINDOW_S:
            w.recent.popleft()
        if len(w.recent) >= MAX_RESTARTS:
            proc.state = "crash-looping"
            log.error("%s (pid %d) %s; %d restarts in %.0f s: not starting it again (crash-looping; "
                      "`meshctl down` then `meshctl up` tries afresh)", proc.name, proc.pid, why, len(w.recent),
                      WINDOW_S)  # fmt: skip
            return
        w.streak = 0 if now - w.since >= STEADY_S else w.streak
        delay = backoff(w.streak)
        w.streak += 1
        w.due = now + delay
        proc.state = "restarting"
        log.warning("%s (pid %d) %s; restarting it %s", proc.name, proc.pid, why,
                    f"in {delay:g} s" if delay else "now")  # fmt: skip

    def restart(self, old: Proc, w: Watch, now: float) -> None:
        if w.counted:
            w.recent.append(now)
        w.ready = False
        try:
            if old.name in self.state.services:
                new = self._from_spare(old) or local.start_service(
                    self.ids, self.state.nats_url, old.service or old.name, name=old.name, http_port=old.http_port
                )
            else:
                new = local.respawn(old)  # nats-server or redis-server: the same ports, store and users
        except OSError as exc:  # its binary or its log cannot be opened: a failed start, counted as one
            old.restarts += 1
            self.ended(old, w, f"could not be started: {exc}", now)
            return
        new.restarts, new.last_exit = old.restarts + 1, old.last_exit
        self.put(new)
        w.since, w.due = now, None
        log.info("%s started again as pid %d (restart %d%s)", new.name, new.pid, new.restarts,
                 ", its warm standby" if STANDBY in new.argv else "")  # fmt: skip
        task = asyncio.get_running_loop().create_task(self.announce(new, now))
        self.announcing.add(task)
        task.add_done_callback(self.announcing.discard)

    def put(self, new: Proc) -> None:
        state = self.state
        if new.name in state.services:
            state.services[new.name] = new
        elif state.redis is not None and state.redis.name == new.name:
            state.redis = new
        else:
            state.nats = [new if p.name == new.name else p for p in state.nats]

    async def announce(self, proc: Proc, since: float) -> None:
        """Log when a restarted process is ready (it says how long the outage was)."""
        try:
            if proc.name in self.state.services:
                await local.wait_ready({proc.name: proc})
            elif self.state.redis is not None and proc.name == self.state.redis.name:
                await local.wait_until(lambda: local.tcp_ok(proc.port), proc.name, 60.0, proc)
            else:
                await local.wait_nats_healthy(proc, cluster=len(self.state.nats) > 1, timeout=60.0)
        except MeshError as exc:
            if proc.alive():  # (one that exited again is the poll's to tell)
                log.warning("%s (pid %d) not ready: %s", proc.name, proc.pid, exc)
            return
        if any(p is proc for p in self.state.procs()):  # not replaced meanwhile
            self.watch[proc.name].ready = True
        log.info("%s ready again (pid %d) %.2f s after its exit was noticed", proc.name, proc.pid,
                 time.monotonic() - since)  # fmt: skip


def _answer(reply: dict[str, Any], log_path: Path) -> None:
    """The one line ``meshctl up`` waits for; then stdout goes to the log (``up`` has gone)."""
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
    with open(log_path, "ab") as out:
        os.dup2(out.fileno(), sys.stdout.fileno())
        os.dup2(out.fileno(), sys.stderr.fileno())


async def serve(spec: dict[str, Any]) -> int:
    """Start the mesh as ``spec`` says (``local.up``'s arguments), answer ``meshctl up``,
    supervise until SIGTERM, stop everything."""
    home = Path(spec.pop("home"))
    log_path = home / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spares = bool(spec.pop("standby", False))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        state = await local.up(home, **spec)
    except MeshError as exc:
        log.error("the mesh did not start: %s", exc)
        _answer({"ok": False, "error": str(exc)}, log_path)
        return 2
    if stop.is_set():  # `meshctl down` came while it started
        local.down(home)
        _answer({"ok": False, "error": "stopped (SIGTERM) while starting"}, log_path)
        return 1
    stat = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[-1].split()
    state.supervisor = Proc("supervisor", os.getpid(), [sys.executable, "-m", MODULE], str(log_path),
                            started=int(stat[19]))  # fmt: skip
    state.save()
    _answer({"ok": True}, log_path)
    log.info("supervising %s (pid %d)", ", ".join(p.name for p in state.procs()), os.getpid())
    keeping = asyncio.create_task(keep(state, Identities(home), stop))
    await Supervisor(state, Identities(home), spares=spares).run(stop)
    await keeping
    log.info("stopping: %s", ", ".join(local.down(home)) or "nothing was running")
    return 0


async def keep(state: MeshState, ids: Identities, stop: asyncio.Event) -> None:
    """The keeper's passes (``meshctl.keeper``) every ``MESH_KEEPER_EVERY_S`` (0: none), as the keeper."""
    every = float(os.environ.get("MESH_KEEPER_EVERY_S", keeper.EVERY_S))
    if every <= 0:
        return
    try:
        nc = await keeper.connect(ids, state.nats_url, max_reconnect_attempts=-1)
    except Exception as exc:  # noqa: BLE001 - the supervisor goes on; retention waits for the next `up`
        log.warning("the keeper could not connect, no retention is enforced: %s", exc)
        return
    try:
        await keeper.run(nc, every, stop, signer=keeper.signer(ids))
    except Exception as exc:  # noqa: BLE001 - no key (an older home): the supervisor goes on without it
        log.warning("the keeper stopped, no retention is enforced: %s", exc)
    finally:
        await nc.close()


def start(home: Path, **up_args: Any) -> MeshState:
    """``meshctl up``: the supervisor, detached, and the mesh it started (``local.up``'s errors
    are raised here as they would be there, as a ``MeshError``)."""
    log_path = home / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    spec = json.dumps({"home": str(home.resolve()), **up_args})
    with open(log_path, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, spec],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,  # outlives `meshctl up`; a Ctrl-C at the terminal does not reach it
        )
    assert proc.stdout is not None  # stdout=PIPE
    line = proc.stdout.readline()
    proc.stdout.close()
    if not line:
        code = proc.wait()
        why = last_line(log_path)
        raise MeshError(f"the supervisor exited ({describe(code)}) before the mesh was up"
                        + (f": {why}" if why else "") + f" (its log: {log_path})")  # fmt: skip
    reply = json.loads(line)
    if not reply["ok"]:
        proc.wait()
        raise MeshError(str(reply["error"]))
    state = MeshState.load(home)
    if state is None:
        raise MeshError(f"the supervisor said the mesh was up, but {home}/run/state.json is gone (see {log_path})")
    return state


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s supervisor %(levelname)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per readiness probe
    return asyncio.run(serve(json.loads(args[0])))


if __name__ == "__main__":
    sys.exit(main())
