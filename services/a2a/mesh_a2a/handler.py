"""The SDK's request handler (``DefaultRequestHandler``), and what a gateway over the mesh adds:

- ids: a new task's id is derived from its message (``inbound.task_id_for``), so a retried send
  is the same task; a send of a task that has ended answers with the task as it ended;
- a person follows at most ``max_tasks_per_user`` tasks here at once;
- ``CancelTask`` also cancels the mesh task (``control.cancel``, through the tenant's door);
- a task that runs but is not followed on this replica (another one took its send, or this one
  restarted) is followed here from the mesh when it is resubscribed to, or given a push config.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator

from a2a.server.agent_execution import RequestContext, RequestContextBuilder
from a2a.server.context import ServerCallContext
from a2a.server.events import Event
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.tasks import PushNotificationConfigStore
from a2a.types import (
    AgentCard,
    CancelTaskRequest,
    Message,
    SendMessageRequest,
    SubscribeToTaskRequest,
    Task,
    TaskPushNotificationConfig,
)
from a2a.utils.errors import InvalidParamsError, InvalidRequestError
from a2a.utils.task import apply_history_length

from mesh_a2a.callers import caller_of
from mesh_a2a.executor import MeshExecutor
from mesh_a2a.inbound import context_id_for, task_id_for
from mesh_a2a.mapping import TERMINAL
from mesh_a2a.push import Check, Sender
from mesh_a2a.store import MeshTaskStore

log = logging.getLogger("mesh.a2a")
CANCEL_WAIT_S = 10.0
"""How long a cancel waits for the planner to end the mesh task (it is cancelled either way)."""


class Ids(RequestContextBuilder):
    """The SDK's request context, with the ids of a new task derived from its message, and the
    context of a follow-up that names only its task taken from the task."""

    def __init__(self, store: MeshTaskStore) -> None:
        self.store = store

    async def build(
        self, context: ServerCallContext, params: SendMessageRequest | None = None, task_id: str | None = None,
        context_id: str | None = None, task: Task | None = None,
    ) -> RequestContext:  # fmt: skip
        if params is not None:
            caller = caller_of(context)
            task_id = task_id or params.message.task_id or None
            named = task_id is not None
            if task_id is None:
                task_id = task_id_for(caller.tenant, caller.subject, caller.agent.name, params.message.message_id)
            if not (context_id or params.message.context_id):
                known = task or (await self.store.get(task_id, context) if named else None)
                context_id = known.context_id if known is not None else context_id_for(task_id)
        return RequestContext(call_context=context, request=params, task_id=task_id, context_id=context_id, task=task)


class Handler(DefaultRequestHandler):
    def __init__(
        self, executor: MeshExecutor, store: MeshTaskStore, card: AgentCard, push_store: PushNotificationConfigStore,
        sender: Sender, check: Check, max_tasks_per_user: int,
    ) -> None:  # fmt: skip
        super().__init__(executor, store, card, push_config_store=push_store, push_sender=sender,
                         request_context_builder=Ids(store), push_url_validator=check)  # fmt: skip
        self.executor, self.store, self.max_tasks_per_user = executor, store, max_tasks_per_user

    async def _admit(self, params: SendMessageRequest, context: ServerCallContext) -> Task | None:
        """None: the SDK takes the message on. A task: the message starts a task that has ended
        (a retry after the answer came): that is the answer."""
        caller = caller_of(context)
        if context.tenant and context.tenant != caller.tenant:
            raise InvalidParamsError(message=f"the request names tenant {context.tenant!r}, its path {caller.tenant!r}")
        message: Message = params.message
        if message.task_id:
            return None  # a follow-up: the SDK finds the task, in the caller's tenant and agent only
        if not message.message_id:
            message.message_id = uuid.uuid4().hex  # no id, no retry to recognise
        known = await self.store.get(task_id_for(caller.tenant, caller.subject, caller.agent.name,
                                                 message.message_id), context)  # fmt: skip
        if known is not None and known.status.state in TERMINAL:
            return apply_history_length(known, params.configuration)
        if known is None and self.executor.busy(caller) >= self.max_tasks_per_user:
            raise InvalidRequestError(
                message=f"{caller.subject} already has {self.executor.busy(caller)} tasks followed here (at most "
                f"{self.max_tasks_per_user} at once): wait for one to end",
                data={"code": "too_many_tasks", "retry_after_s": 5.0},
            )
        return None

    async def on_message_send(self, params: SendMessageRequest, context: ServerCallContext) -> Message | Task:
        known = await self._admit(params, context)
        if known is not None:
            return known
        answer: Message | Task = await super().on_message_send(params, context)  # (the SDK's decorators: Any)
        return answer

    async def on_message_send_stream(
        self, params: SendMessageRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        known = await self._admit(params, context)
        if known is not None:
            yield known
            return
        async for event in super().on_message_send_stream(params, context):
            yield event

    async def on_cancel_task(self, params: CancelTaskRequest, context: ServerCallContext) -> Task | None:
        task: Task | None = await super().on_cancel_task(params, context)
        caller = caller_of(context)
        ended = await caller.client.control("cancel", params.id, f"cancelled over A2A by {caller.subject}",
                                            timeout=CANCEL_WAIT_S)  # fmt: skip
        log.info("%s/%s cancelled over A2A by %s: %s", caller.tenant, params.id, caller.subject,
                 ended.type if ended is not None else "cancel sent")  # fmt: skip
        return task

    async def on_subscribe_to_task(
        self, params: SubscribeToTaskRequest, context: ServerCallContext
    ) -> AsyncGenerator[Event, None]:
        follow = await self._follow_here(params.id, context)
        if follow is None:
            async for event in super().on_subscribe_to_task(params, context):
                yield event
            return
        active = await self._active_task_registry.get_or_create(params.id, call_context=context)
        async for event in active.subscribe(request=follow, include_initial_task=True):
            yield event

    async def on_create_task_push_notification_config(
        self, params: TaskPushNotificationConfig, context: ServerCallContext
    ) -> TaskPushNotificationConfig:
        config: TaskPushNotificationConfig = await super().on_create_task_push_notification_config(params, context)
        # The config is held here: so this replica follows the task and sends it its updates.
        follow = await self._follow_here(params.task_id, context)
        if follow is not None:
            active = await self._active_task_registry.get_or_create(params.task_id, call_context=context)
            await active.enqueue_request(follow)
        return config

    async def _follow_here(self, task_id: str, context: ServerCallContext) -> RequestContext | None:
        """A request to follow ``task_id`` from the mesh, when it runs and no one follows it on this
        replica (None: it has ended, or is followed here already)."""
        if await self._active_task_registry.get(task_id) is not None:
            return None  # the SDK's own: this replica runs it (or parks it, waiting for input)
        task = await self.store.get(task_id, context)
        if task is None or task.status.state in TERMINAL:
            return None
        return RequestContext(call_context=context, task_id=task.id, context_id=task.context_id, task=task)
