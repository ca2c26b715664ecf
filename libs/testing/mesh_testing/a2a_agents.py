"""A real A2A agent for tests: the a2a SDK's own server (an ``AgentExecutor`` behind its
``DefaultRequestHandler`` and starlette routes), served by uvicorn on a loopback port in a thread
of the test process, with scripted behaviour.

What the agent does with a message is decided by its text:

- ``fail: REASON`` / ``reject: REASON``: the task fails / is rejected with REASON;
- ``ask: QUESTION``: the task stops, input required, asking QUESTION;
- ``sleep: SECONDS``: the task works that long, then answers (a cancel ends it sooner);
- ``message: TEXT``: a direct message reply, no task;
- text containing a key of ``answers``: that answer, as the task's artifact;
- anything else: ``echo: TEXT``.

Its card can be changed while it runs (``change``); it can demand a bearer token on its JSON-RPC
route (``token``, changeable too), and it records what it received (``received``) and which tasks
were canceled (``canceled``), for tests to read from outside the mesh.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from a2a.helpers import new_task_from_user_message, new_text_message
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import AgentCapabilities, AgentCard, AgentInterface, AgentSkill, Part
from starlette.applications import Starlette

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RPC_PATH = "/a2a"
STARTUP_S = 30.0


@dataclass
class Skill:
    """One skill on the card."""

    id: str
    name: str
    description: str
    examples: list[str] = field(default_factory=list)


@dataclass
class Received:
    """A message the agent was sent."""

    message_id: str
    text: str
    skill: str  # the skill the message's metadata names ('' if none)
    task_id: str = ""


class _Executor(AgentExecutor):
    def __init__(self, agent: A2AAgent) -> None:
        self.agent = agent

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.message is not None
        text = context.get_user_input()
        meta = context.message.metadata.fields
        seen = Received(context.message.message_id, text, meta["skill"].string_value if "skill" in meta else "")
        self.agent.received.append(seen)
        command, _, rest = text.partition(":")
        rest = rest.strip()
        if command == "message":
            await event_queue.enqueue_event(new_text_message(rest, context_id=context.context_id))
            return
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        seen.task_id = task.id
        up = TaskUpdater(event_queue, task.id, task.context_id)
        await up.start_work()
        if command == "sleep":
            await asyncio.sleep(float(rest))
        if command in ("fail", "reject", "ask"):
            say = up.new_agent_message([Part(text=rest)])
            await {"fail": up.failed, "reject": up.reject, "ask": up.requires_input}[command](say)
            return
        answer = next((a for k, a in self.agent.answers.items() if k in text), f"echo: {text}")
        await up.add_artifact([Part(text=answer)], name="answer")
        await up.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        assert context.task_id is not None and context.context_id is not None
        self.agent.canceled.append(context.task_id)
        await TaskUpdater(event_queue, context.task_id, context.context_id).cancel()


class A2AAgent:
    """One A2A agent process-in-a-thread (see the module docstring). Use as a context manager."""

    def __init__(
        self,
        *,
        name: str = "Helper",
        description: str = "Answers questions about orders.",
        skills: list[Skill] | None = None,
        token: str | None = None,
        answers: dict[str, str] | None = None,
    ) -> None:
        self.token = token
        self.answers = dict(answers or {})
        self.received: list[Received] = []
        self.canceled: list[str] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.card = AgentCard(
            name=name,
            description=description,
            version="1.0.0",
            supported_interfaces=[
                AgentInterface(url=f"{self.url}{RPC_PATH}", protocol_binding="JSONRPC", protocol_version="1.0")
            ],
            capabilities=AgentCapabilities(streaming=False),
            default_input_modes=["text/plain"],
            default_output_modes=["text/plain"],
        )
        self.change(skills=skills if skills is not None else [Skill("answer", "Answer", "Answers a question.")])
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The agent's base URL (its card is at ``/.well-known/agent-card.json``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def card_url(self) -> str:
        return f"{self.url}/.well-known/agent-card.json"

    def change(self, *, description: str | None = None, skills: list[Skill] | None = None) -> None:
        """The card served from now on says this instead."""
        card = AgentCard()
        card.CopyFrom(self.card)
        if description is not None:
            card.description = description
        if skills is not None:
            del card.skills[:]
            card.skills.extend(AgentSkill(id=s.id, name=s.name, description=s.description, examples=s.examples,
                                          tags=["test"]) for s in skills)  # fmt: skip
        self.card = card

    def _app(self) -> ASGIApp:
        async def card(_: AgentCard) -> AgentCard:
            return self.card

        handler = DefaultRequestHandler(agent_executor=_Executor(self), task_store=InMemoryTaskStore(),
                                        agent_card=self.card)  # fmt: skip
        app = Starlette(routes=[*create_agent_card_routes(self.card, card_modifier=card),
                                *create_jsonrpc_routes(handler, RPC_PATH)])  # fmt: skip
        return self._guard(app)

    def _guard(self, app: ASGIApp) -> ASGIApp:
        """The bearer check in front of the JSON-RPC route (the card stays public)."""

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"] == RPC_PATH and self.token is not None:
                headers = dict(scope["headers"])
                if headers.get(b"authorization", b"").decode() != f"Bearer {self.token}":
                    body = b'{"error": "unauthorized"}'
                    await send({"type": "http.response.start", "status": 401,
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode())]})  # fmt: skip
                    await send({"type": "http.response.body", "body": body})
                    return
            await app(scope, receive, send)

        return guarded

    def start(self) -> A2AAgent:
        config = uvicorn.Config(self._app(), log_level="warning", lifespan="off", ws="none", http="h11",
                                access_log=False)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + STARTUP_S
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"A2A agent on port {self.port} did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(30)
        self._sock.close()

    def __enter__(self) -> A2AAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
