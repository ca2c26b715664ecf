"""Control is obeyed everywhere: the check every service runs before its next model or tool call.

A task may be stopped three ways, and the guard sees all three:

- a control message (``control.halt`` / ``control.cancel`` / ``control.resume``), received on a
  core subscription by every replica of every service, so a stop takes effect at the next
  call without waiting for the planner;
- the task's status (``status`` bucket: the planner writes a halt, an end and a resume there;
  nothing of the task's content), so a service that missed the message (it was down, or it
  started later) still stops;
- a kill switch (``control`` bucket, written by an operator with ``meshctl kill-switch``), per
  tenant (``kill.tenant.<tenant>``) or global (``kill.global``).

The guard reads a task's status and the kill switches once and then keeps them current from
the buckets' republished feeds (``mesh_durable.view``): a write is seen when its fed message
arrives (milliseconds), a lost one no later than ``MESH_GUARD_VIEW_S``, and a check costs no
round trip. ``MESH_GUARD_VIEW_S=0`` reads both buckets before every call instead.
"""

from __future__ import annotations

import json
import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from mesh_contracts import ContractError, parse_message
from mesh_contracts.v1 import ControlCancel, ControlHalt, ControlResume
from mesh_contracts.v1.records import StatusRecord, TaskRecord
from mesh_durable.errors import DurableError
from mesh_durable.view import KeyView
from mesh_identity import IdentityError
from mesh_kit import envelope as env

if TYPE_CHECKING:
    from mesh_host.mesh import Mesh

log = logging.getLogger("mesh.guard")
CONTROL_BUCKET = "control"
GLOBAL_KEY = "kill.global"
RECORD_LAG_S = 5.0


def tenant_key(tenant: str) -> str:
    return f"kill.tenant.{tenant}"


@dataclass(frozen=True)
class Stop:
    """Why the next call must not be made. ``halted``: the task may resume later."""

    reason: str
    halted: bool = False
    code: str = "stopped"


class Stopped(DurableError):
    """Raised instead of making a model or tool call for a stopped task."""

    def __init__(self, stop: Stop) -> None:
        super().__init__(stop.reason)
        self.stop = stop


_GUARDS: weakref.WeakKeyDictionary[Mesh, Guard] = weakref.WeakKeyDictionary()


def enable(mesh: Mesh) -> Guard:
    """Check halt / cancel / kill switches before every model or tool call of this service: the
    guard starts with the mesh (after connecting, before any handler runs). Idempotent."""
    guard = _GUARDS.get(mesh)
    if guard is None:
        guard = _GUARDS[mesh] = Guard(mesh)
        mesh.on_start(guard.start)
    return guard


def of(mesh: Mesh) -> Guard | None:
    """The guard this service enabled, if it did (a library making a call asks it here)."""
    return _GUARDS.get(mesh)


class Guard:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.status_view: KeyView | None = None
        self.switch_view: KeyView | None = None
        self.seen: dict[tuple[str, str], Stop] = {}  # from control messages, newest wins
        self._seen_at: dict[tuple[str, str], float] = {}
        self._sub: Any = None

    async def start(self) -> None:
        nc, max_age = self.mesh.nc, self.mesh.settings.guard_view_s
        status, control = await self.mesh.kv(StatusRecord.bucket), await self.mesh.kv(CONTROL_BUCKET)
        self.status_view = KeyView(nc, status, StatusRecord.bucket, max_age_s=max_age)
        self.switch_view = KeyView(nc, control, CONTROL_BUCKET, max_age_s=max_age, size=10_000)
        await self.status_view.start()
        await self.switch_view.start()
        self._sub = await self.mesh.nc.subscribe("control.*.*.*.*", cb=self._on_control)

    async def _on_control(self, msg: Msg) -> None:
        try:
            model = parse_message(msg.subject, msg.data)
            sender = await self.mesh.verify_current(
                lambda: self.mesh.verifier.verify((msg.headers or {}).get(env.IDENTITY), msg.data, model)
            )
        except (ContractError, IdentityError) as exc:
            log.warning("ignored control message on %s: %s", msg.subject, exc)
            return
        key = (model.tenant, model.task_id)
        if isinstance(model, ControlResume):
            self.seen.pop(key, None)
            return
        self._seen_at[key] = time.monotonic()
        if len(self._seen_at) > 100_000:  # forget the oldest: the task record still stops them
            for old in list(self._seen_at)[:10_000]:
                self._seen_at.pop(old, None)
                self.seen.pop(old, None)
        if isinstance(model, ControlHalt):
            self.seen[key] = Stop(f"task halted by {sender.name}: {model.reason}", halted=True)
        elif isinstance(model, ControlCancel):
            self.seen[key] = Stop(f"task cancelled by {sender.name}: {model.reason}")

    async def kill_switch(self, tenant: str) -> Stop | None:
        assert self.switch_view is not None, "the guard is started with the mesh"
        scopes = ((GLOBAL_KEY, "global"), (tenant_key(tenant), f"tenant {tenant}"))
        values = [await self.switch_view.get(key) for key, _ in scopes]  # from memory, nearly always
        for (_, scope), value in zip(scopes, values, strict=True):
            if value:
                why = json.loads(value).get("reason", "")
                return Stop(f"kill switch ({scope}) is on: {why}", code="kill_switch")
        return None

    async def check(self, tenant: str, task_id: str) -> Stop | None:
        """The reason the task must not make its next call, or None."""
        if self.status_view is None:  # not started (in-memory tests): nothing to consult
            return None
        stop = await self.kill_switch(tenant)
        raw = await self.status_view.get(TaskRecord.key(tenant, task_id))
        rec = StatusRecord.model_validate_json(raw) if raw else None
        if stop is not None:
            return stop
        if rec is not None and rec.status == "halted":
            return Stop(f"task halted: {rec.reason}", halted=True)
        if rec is not None and rec.status in ("failed", "cancelled", "completed"):
            return Stop(f"task {rec.status}" + (f": {rec.reason}" if rec.reason else ""))
        seen = self.seen.get((tenant, task_id))
        if seen is not None and time.monotonic() - self._seen_at.get((tenant, task_id), 0) > RECORD_LAG_S:
            # The planner applies a control message and writes a halt within milliseconds. A task
            # not halted this long after a halt we saw was resumed (a resume we missed).
            self.seen.pop((tenant, task_id), None)
        return self.seen.get((tenant, task_id))

    async def ensure(self, tenant: str, task_id: str) -> None:
        stop = await self.check(tenant, task_id)
        if stop is not None:
            self.mesh.count("mesh.control.calls_refused")  # durable_metrics.M_CALLS_REFUSED
            raise Stopped(stop)
