"""The A2A task store: the mesh itself.

An A2A task is a mesh task of the same id, and the mesh stores what it is: its submission (the
goal, the caller, the A2A context and agent, in its labels), its events, the call it waits on, its
outcome. ``get`` reads those (direct gets, verified against the trust bundle and opened with the
tenant's data key, as the edge's follower does), so any replica answers for any task, and a
finished task is there after every restart, for as long as the mesh keeps the tenant's tasks
(its retention). What the gateway keeps in memory is a bounded cache of the detail the mesh does
not store: the streamed drafts and status lines of the tasks this replica followed.

A task of another tenant is never found (the caller's tenant client reads its own subjects only),
nor one sent to another agent of the tenant, nor a mesh task not submitted over A2A.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from a2a.server.context import ServerCallContext
from a2a.server.tasks import TaskStore
from a2a.types import ListTasksRequest, ListTasksResponse, Task
from a2a.utils.errors import UnsupportedOperationError

from mesh_a2a.callers import Caller, caller_of
from mesh_a2a.inbound import LABEL_AGENT, TASK_PREFIX
from mesh_a2a.mapping import ANSWER, M_AGENT, TERMINAL, meta, rebuilt
from mesh_contracts import ContractError
from mesh_contracts.v1 import ApprovalDecided, ApprovalRequested, TaskSubmitted
from mesh_edge.follow import Event, believed
from mesh_identity import IdentityError

log = logging.getLogger("mesh.a2a")

CACHED_TASKS = 4096
"""Tasks whose streamed detail a replica keeps (the oldest go first; the mesh keeps the rest)."""


def _copy(task: Task) -> Task:
    out = Task()
    out.CopyFrom(task)
    return out


async def read(caller: Caller, task_id: str, can_decide: bool) -> Task | None:
    """The A2A task the mesh stored under ``task_id`` for the caller's tenant and agent, or None."""
    client = caller.client
    if not task_id.startswith(TASK_PREFIX):
        return None
    stored = await client._stored(TaskSubmitted, task_id)
    if stored is None:
        return None
    try:
        submitted = client._believe(*stored)
    except (ContractError, IdentityError) as exc:
        log.warning("a stored submission of %s/%s did not verify: %s", caller.tenant, task_id, exc)
        return None
    assert isinstance(submitted, TaskSubmitted)
    if submitted.labels.get(LABEL_AGENT) != caller.agent.name:
        return None
    found = await client._stored_outcome(task_id)
    outcome = believed(client, *found) if found is not None else None
    waiting = None
    if outcome is None and submitted.policy.on_held == "wait":
        waiting = await _waiting(caller, task_id)
    body = submitted.model_dump(mode="json", include={"goal", "inputs", "labels", "policy"})
    return rebuilt(task_id, body, outcome.data if outcome else None, waiting, can_decide)


async def _waiting(caller: Caller, task_id: str) -> Event | None:
    """The held call the task waits on: its last one asked for and not decided."""
    client = caller.client
    asked = await client._stored(ApprovalRequested, task_id)
    if asked is None or (request := believed(client, *asked)) is None:
        return None
    answered = await client._stored(ApprovalDecided, task_id)
    decision = believed(client, *answered) if answered is not None else None
    if decision is not None and decision.data.get("approval_id") == request.data.get("approval_id"):
        return None
    return request


class MeshTaskStore(TaskStore):
    """The SDK's task store over the mesh (``read``), with the detail of followed tasks cached."""

    def __init__(self, can_decide: Callable[[Caller], bool], size: int = CACHED_TASKS) -> None:
        self.can_decide, self.size = can_decide, size
        self.cache: OrderedDict[tuple[str, str], Task] = OrderedDict()
        self.creating: set[tuple[str, str]] = set()
        """Tasks this replica is creating: until the SDK saved the first version, the mesh's (the
        submission, stored before the SDK got to it) is not theirs to read."""

    def create(self, tenant: str, task_id: str, *, done: bool = False) -> None:
        """Mark a task this replica creates (``done``: it was saved, or its creation failed)."""
        (self.creating.discard if done else self.creating.add)((tenant, task_id))

    async def save(self, task: Task, context: ServerCallContext) -> None:
        key = (caller_of(context).tenant, task.id)
        self.creating.discard(key)
        self.cache[key] = _copy(task)
        self.cache.move_to_end(key)
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)

    async def get(self, task_id: str, context: ServerCallContext) -> Task | None:
        caller = caller_of(context)
        cached = self.cache.get((caller.tenant, task_id))
        if cached is not None and meta(cached, M_AGENT) != caller.agent.name:
            return None
        if (cached is not None and cached.status.state in TERMINAL) or (caller.tenant, task_id) in self.creating:
            return _copy(cached) if cached is not None else None
        stored = await read(caller, task_id, self.can_decide(caller))
        if cached is None:
            return stored
        if stored is not None and stored.status.state in TERMINAL:
            # it ended, and the follower here has not seen it (yet, or it stopped following)
            merged = _copy(cached)
            merged.status.CopyFrom(stored.status)
            merged.artifacts.extend(a for a in stored.artifacts if a.artifact_id == ANSWER)
            return merged
        return _copy(cached)

    async def list(self, params: ListTasksRequest, context: ServerCallContext) -> ListTasksResponse:
        raise UnsupportedOperationError(
            message="listing tasks is not offered: GetTask reads one (meshctl history lists a tenant's)"
        )

    async def delete(self, task_id: str, context: ServerCallContext) -> None:
        self.cache.pop((caller_of(context).tenant, task_id), None)
