"""The agent executor: an A2A message becomes a mesh task submitted as the caller's tenant, and the
task's events, followed verified and opened (``mesh_edge.follow``), become the A2A task's updates
(``mesh_a2a.mapping``).

One execution is one of:

- a new task: its message asks (``mesh_a2a.inbound``); submitted through the tenant's door with
  the caller in its labels, then followed to its outcome;
- a decision: a follow-up message on a task waiting for the caller's decision on a held call
  (``input-required``), signed with the caller's approver key, then followed again from the call;
- a follow: a task that exists (a retried send, a resubscription or a push config on a replica
  that was not following it): followed from the mesh's stored events, nothing submitted.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.types import Message, Task, TaskState, TaskStatus
from pydantic import ValidationError

from mesh_a2a.callers import Caller, caller_of
from mesh_a2a.errors import BadAsk
from mesh_a2a.inbound import ask_of, decision_of, labels_for
from mesh_a2a.mapping import M_AFTER, M_AGENT, M_APPROVAL, M_ON_HELD, TERMINAL, Translator, meta, status, struct
from mesh_a2a.settings import A2aSettings
from mesh_a2a.store import MeshTaskStore
from mesh_contracts.v1 import TaskRejected
from mesh_edge.follow import Event, Follow
from mesh_edge.tenants import Tenants
from mesh_edge.users import Forbidden
from meshctl.approver import ApprovalError

log = logging.getLogger("mesh.a2a")

WORKING, INPUT = TaskState.TASK_STATE_WORKING, TaskState.TASK_STATE_INPUT_REQUIRED


def can_decide(tenants: Tenants, caller: Caller) -> bool:
    """Whether the caller holds an approver key of their tenant here (``approver.<t>.<p>.pem``)."""
    try:
        tenants.approver(caller.tenant, caller.subject)
    except Forbidden:
        return False
    return True


class MeshExecutor(AgentExecutor):
    def __init__(self, settings: A2aSettings, tenants: Tenants, store: MeshTaskStore) -> None:
        self.settings, self.tenants, self.store = settings, tenants, store
        self.running: Counter[tuple[str, str]] = Counter()
        """Executions in progress, per person (``max_tasks_per_user``)."""

    def busy(self, caller: Caller) -> int:
        return self.running[(caller.tenant, caller.subject)]

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        caller = caller_of(context.call_context)
        who = (caller.tenant, caller.subject)
        self.running[who] += 1
        try:
            task = context.current_task
            if task is None:
                self.store.create(caller.tenant, context.task_id or "")
                try:
                    await self._start(context, caller, event_queue)
                finally:
                    self.store.create(caller.tenant, context.task_id or "", done=True)
            elif task.status.state in TERMINAL:
                return  # nothing more will happen to it
            elif context.message is not None and task.status.state == INPUT:
                await self._answer(context.message, caller, task, event_queue)
            else:
                await self._follow(caller, task, event_queue)
        finally:
            self.running[who] -= 1
            if self.running[who] <= 0:
                del self.running[who]

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        """The A2A task ends canceled here; the request handler then cancels the mesh task."""
        caller = caller_of(context.call_context)
        task_id, context_id = context.task_id or "", context.context_id or ""
        await event_queue.enqueue_event(
            status(task_id, context_id, TaskState.TASK_STATE_CANCELED, f"cancelled by {caller.subject}")
        )

    async def _start(self, context: RequestContext, caller: Caller, queue: EventQueue) -> None:
        message, task_id, context_id = context.message, context.task_id or "", context.context_id or ""
        assert message is not None  # a new task comes with the message that asks for it
        try:
            ask = ask_of(message, caller.agent, context.metadata)
            labels = labels_for(caller.subject, context_id, caller.agent.name)
        except BadAsk as exc:
            await self._created(queue, task_id, context_id, message, caller, "continue")
            await queue.enqueue_event(status(task_id, context_id, TaskState.TASK_STATE_REJECTED, str(exc)))
            return
        await self._created(queue, task_id, context_id, message, caller, ask.policy.on_held)
        follow = Follow(caller.client, task_id)
        await follow.start()  # before the submission: nothing it streams is missed
        try:
            try:
                followed = await caller.client.submit(
                    ask.goal, task_id=task_id, policy=ask.policy, priority=ask.priority, labels=labels,
                    inputs=ask.inputs, follow=False, **caller.agent.submission,
                )  # fmt: skip
            except ValidationError as exc:  # what the contract refuses (a label, an input): the caller's to fix
                await queue.enqueue_event(status(task_id, context_id, TaskState.TASK_STATE_REJECTED,
                                                 f"not a task the mesh takes: {exc.errors()[0]['msg']}"))  # fmt: skip
                return
            refused = followed.outcome
            log.info("%s/%s submitted over A2A by %s to %s: %s", caller.tenant, task_id, caller.subject,
                     caller.agent.name, refused.code if isinstance(refused, TaskRejected) else "accepted")  # fmt: skip
            if isinstance(refused, TaskRejected):
                outcome = Event("outcome", refused.model_dump(mode="json", exclude={"tenant"}))
                events, _ = Translator(task_id, context_id, waits=False, can_decide=False).translate(outcome)
                for event in events:
                    await queue.enqueue_event(event)
                return
            await queue.enqueue_event(status(task_id, context_id, WORKING, "submitted to the mesh"))
            await self._pump(follow, caller, task_id, context_id, ask.policy.on_held == "wait", queue)
        finally:
            await follow.close()

    @staticmethod
    async def _created(
        queue: EventQueue, task_id: str, context_id: str, message: Message, caller: Caller, on_held: str
    ) -> None:
        """The A2A task, as the caller's message made it (the SDK's first event of a new task)."""
        task = Task(id=task_id, context_id=context_id, status=TaskStatus(state=TaskState.TASK_STATE_SUBMITTED),
                    history=[message], metadata=struct({M_AGENT: caller.agent.name, M_ON_HELD: on_held}))  # fmt: skip
        await queue.enqueue_event(task)

    async def _answer(self, message: Message, caller: Caller, task: Task, queue: EventQueue) -> None:
        """A follow-up message on a task waiting for the caller's decision."""
        decision = decision_of(message)
        approval_id = (decision.approval_id if decision else "") or meta(task, M_APPROVAL)
        if decision is None:
            await queue.enqueue_event(status(task.id, task.context_id, INPUT,
                                             "Reply 'approve' or 'deny' (a comment may follow)."))  # fmt: skip
            return
        try:
            approver = self.tenants.approver(caller.tenant, caller.subject)
            waiting = await approver.get(approval_id)
            if waiting is None or (waiting["tenant"], waiting["task_id"]) != (caller.tenant, task.id):
                raise ApprovalError(f"task {task.id} has no approval {approval_id!r}")
            record = await approver.decide(approval_id, decision.approve, decision.comment)
            line = f"{record['status']} by {record.get('decided_by', caller.subject)}"
        except Forbidden as exc:  # their key is gone since they were asked: an approver decides elsewhere
            line = str(exc)
        except ApprovalError as exc:
            line = str(exc)
        await queue.enqueue_event(status(task.id, task.context_id, WORKING, line))
        await self._follow(caller, task, queue, after=meta(task, M_AFTER))

    async def _follow(self, caller: Caller, task: Task, queue: EventQueue, after: str = "") -> None:
        """Follow a task that exists, from its stored events (after ``after``) to its outcome."""
        follow = Follow(caller.client, task.id, after)
        await follow.start()
        try:
            await self._pump(follow, caller, task.id, task.context_id, meta(task, M_ON_HELD) == "wait", queue)
        finally:
            await follow.close()

    async def _pump(
        self, follow: Follow, caller: Caller, task_id: str, context_id: str, waits: bool, queue: EventQueue
    ) -> None:
        """The task's mesh events as A2A events, until its outcome, a question for the caller or
        ``follow_timeout_s``."""
        translator = Translator(task_id, context_id, waits=waits, can_decide=can_decide(self.tenants, caller))
        events = follow.events()
        try:
            async with asyncio.timeout(self.settings.follow_timeout_s):
                async for event in events:
                    out, last = translator.translate(event)
                    for update in out:
                        await queue.enqueue_event(update)
                    if last:
                        return
        except TimeoutError:
            await queue.enqueue_event(status(task_id, context_id, WORKING, (
                f"followed for {self.settings.follow_timeout_s:g} s: the task runs on in the mesh "
                "(GetTask or SubscribeToTask see it end)")))  # fmt: skip
        finally:
            await events.aclose()
