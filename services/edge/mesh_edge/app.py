"""The edge's HTTP API (``/v1``) and, when configured, the example web app at ``/``.

    POST /v1/tasks                    {"goal": "...", "task_id"?, "priority"?, "labels"?}  -> 202
    GET  /v1/tasks/{task_id}/events   text/event-stream: progress, token, outcome (resume: Last-Event-ID)
    GET  /v1/tasks/{task_id}          {"task_id", "state", "outcome"}
    POST /v1/tasks/{task_id}/cancel   {"reason"?}                                          -> 202
    POST /v1/tasks/{task_id}/approvals/{approval_id}   {"approve": true|false, "comment"?}   -> 200

Every call carries ``Authorization: Bearer <user token>``; errors are ``{"error": code,
"message": one line}`` with the HTTP status saying which kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nats.aio.client import Client as NATS
from opentelemetry import propagate, trace
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from mesh_contracts.base import ID_PATTERN
from mesh_contracts.v1 import TaskPolicy, TaskRejected
from mesh_edge.errors import EdgeError
from mesh_edge.follow import Follow, believed
from mesh_edge.settings import EdgeSettings
from mesh_edge.tenants import Tenants
from mesh_edge.users import Forbidden, Unauthorized, User, Users
from mesh_kit.telemetry import A_TASK, A_TENANT, Telemetry, setup
from mesh_tenancy import door
from mesh_tenancy.door import DoorRefused
from meshctl.approver import ApprovalError
from meshctl.client import TenantClient
from meshctl.submission import traceparent

log = logging.getLogger("mesh.edge")

M_REQUESTS = "mesh.edge.requests"
M_STREAMS = "mesh.edge.streams_open"
ID = re.compile(ID_PATTERN)
STATUS = {**door.STATUS, "too_many_in_flight": 429}
"""HTTP status of a refusal, the door's (anything else, ``overloaded``, ``unavailable``: 503) and
the planner's admission's."""


class BadRequest(EdgeError):
    """HTTP 400."""


class NotFound(EdgeError):
    """HTTP 404."""


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status)


Handler = Callable[[Request, User, TenantClient], Awaitable[Response]]


class TooMany(EdgeError):
    """HTTP 429: a person holds as many event streams open as they may."""


class EventStream(StreamingResponse):
    """A ``text/event-stream`` answer whose ``closed`` runs however it ends (the task's outcome,
    the client gone, the server stopping), even if its body was never read: what the stream
    holds (its subscriptions, its place in the person's count) is given back every time."""

    def __init__(self, body: AsyncIterator[bytes], closed: Callable[[], Awaitable[None]]) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        self.closed = closed

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.closed()


class Edge:
    def __init__(self, settings: EdgeSettings, nc: NATS, users: Users, telemetry: Telemetry | None = None) -> None:
        self.settings, self.nc, self.users = settings, nc, users
        self.telemetry = telemetry or setup("edge")
        self.tracer = self.telemetry.tracer_provider.get_tracer("mesh_edge")
        meter = self.telemetry.meter_provider.get_meter("mesh_edge")
        self.m_requests = meter.create_counter(M_REQUESTS, description="API calls, by route and HTTP status")
        self.m_streams = meter.create_up_down_counter(M_STREAMS, description="event streams open")
        self.tenants = Tenants(settings, nc)
        self.streams: dict[tuple[str, str], int] = {}
        """Event streams open, per person (tenant, subject)."""

    def guarded(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` for a verified user of a tenant this edge serves; every refusal in one line."""

        async def endpoint(request: Request) -> Response:
            route = request.scope["route"].path if "route" in request.scope else request.url.path
            parent = propagate.extract(dict(request.headers))  # a browser or app that traces: the task joins its trace
            with self.tracer.start_as_current_span(f"{request.method} {route}", context=parent,
                                                   kind=trace.SpanKind.SERVER) as span:  # fmt: skip
                response = await answer(request, span)
                span.set_attribute("http.response.status_code", response.status_code)
                self.m_requests.add(1, {"http.route": route, "http.response.status_code": response.status_code})
                response.headers["traceparent"] = traceparent()  # this span's, which the task joins
                return response

        async def answer(request: Request, span: trace.Span) -> Response:
            try:
                user = self.users.verify(request.headers.get("authorization"))
                span.set_attributes({A_TENANT: user.tenant, "enduser.id": user.subject})
                if "task_id" in request.path_params:
                    span.set_attribute(A_TASK, request.path_params["task_id"])
                client = self.tenants.client(user.tenant)
                for name in ("task_id", "approval_id"):
                    value = request.path_params.get(name)
                    if value is not None and not ID.match(value):
                        raise BadRequest(f"a {name.replace('_', ' ')} is 1-64 letters, digits, '-' or '_'")
                return await handler(request, user, client)
            except Unauthorized as exc:
                return _error(401, "unauthorized", str(exc))
            except Forbidden as exc:
                return _error(403, "forbidden", str(exc))
            except BadRequest as exc:
                return _error(400, "invalid", str(exc))
            except NotFound as exc:
                return _error(404, "not_found", str(exc))
            except TooMany as exc:
                return _error(429, "too_many_streams", str(exc), retry_after_s=5.0)
            except ApprovalError as exc:
                return _error(409, "conflict", str(exc))
            except DoorRefused as exc:
                return _error(STATUS.get(exc.code, 503), exc.code, str(exc), retry_after_s=exc.retry_after_s)

        return endpoint

    async def _body(self, request: Request) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > 4 * self.settings.max_goal_chars + 16_384:
            raise BadRequest("request body too large")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body is a JSON object")
        return body

    async def submit(self, request: Request, user: User, client: TenantClient) -> Response:
        body = await self._body(request)
        goal = body.get("goal")
        if not isinstance(goal, str) or not goal.strip():
            raise BadRequest('"goal" is required: the task, in words')
        if len(goal) > self.settings.max_goal_chars:
            raise BadRequest(f'"goal" is longer than {self.settings.max_goal_chars} characters')
        priority = body.get("priority", 5)
        if not isinstance(priority, int) or not 0 <= priority <= 9:
            raise BadRequest('"priority" is 0-9')
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
            raise BadRequest('"labels" is an object of strings')
        task_id = body.get("task_id") or self._task_id(user, request.headers.get("idempotency-key"))
        if not isinstance(task_id, str) or not ID.match(task_id):
            raise BadRequest("a task id is 1-64 letters, digits, '-' or '_'")
        try:
            policy = TaskPolicy.model_validate(body.get("policy") or {})
        except ValidationError as exc:
            raise BadRequest(
                f'"policy": {exc.errors()[0]["msg"]} ({".".join(map(str, exc.errors()[0]["loc"]))})'
            ) from None
        followed = await client.submit(
            goal, task_id=task_id, priority=priority, policy=policy, labels={**labels, "user": user.subject},
            follow=False,
        )  # fmt: skip
        refused = followed.outcome
        log.info("submitted %s/%s for %s: %s", user.tenant, task_id, user.subject,
                 refused.code if isinstance(refused, TaskRejected) else "accepted")  # fmt: skip
        if isinstance(refused, TaskRejected):
            return _error(
                STATUS.get(refused.code, 503),
                refused.code,
                refused.reason,
                retry_after_s=refused.retry_after_s,
                task_id=task_id,
            )
        return JSONResponse(
            {"task_id": task_id, "tenant": user.tenant, "events": f"/v1/tasks/{task_id}/events"}, status_code=202
        )

    @staticmethod
    def _task_id(user: User, key: str | None) -> str:
        """The same ``Idempotency-Key`` from the same person is the same task (a retry is stored once)."""
        if not key:
            return f"w-{uuid.uuid4().hex[:16]}"
        return "w-" + hashlib.sha256(f"{user.tenant}\0{user.subject}\0{key}".encode()).hexdigest()[:16]

    async def events(self, request: Request, user: User, client: TenantClient) -> Response:
        who = (user.tenant, user.subject)
        if self.streams.get(who, 0) >= self.settings.max_streams_per_user:
            raise TooMany(f"{user.subject} already follows {self.streams[who]} tasks here (at most "
                          f"{self.settings.max_streams_per_user} at once): close one")  # fmt: skip
        after = request.headers.get("last-event-id") or request.query_params.get("after", "")
        follow = Follow(client, request.path_params["task_id"], after)
        self.streams[who] = self.streams.get(who, 0) + 1
        self.m_streams.add(1)

        async def closed() -> None:
            self.m_streams.add(-1)
            await follow.close()
            left = self.streams.pop(who, 1) - 1
            if left:
                self.streams[who] = left

        try:
            await follow.start()  # subscribed before the answer's headers: a submission after them misses nothing
        except BaseException:
            await closed()
            raise
        # a stream ends when the person's token does (their page signs in again and resumes)
        until = min(self.settings.follow_timeout_s, user.expires - time.time())
        return EventStream(self._sse(follow, request, until), closed)

    async def _sse(self, follow: Follow, request: Request, until_s: float) -> AsyncIterator[bytes]:
        yield b"retry: 1000\n\n"
        events = follow.events()
        deadline = asyncio.get_running_loop().time() + until_s
        pending: asyncio.Task[Any] | None = None
        try:
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                pending = pending or asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait({pending}, timeout=min(self.settings.keepalive_s, left))
                if not done:
                    if await request.is_disconnected():
                        return
                    yield b": keepalive\n\n"
                    continue
                pending, event = None, done.pop().result()
                head = f"id: {event.id}\n" if event.id else ""
                yield f"{head}event: {event.kind}\ndata: {json.dumps(event.data, ensure_ascii=False)}\n\n".encode()
                if event.last:
                    return
        except StopAsyncIteration:
            return
        finally:
            if pending is not None:
                pending.cancel()
            with contextlib.suppress(Exception):
                await events.aclose()

    async def status(self, request: Request, user: User, client: TenantClient) -> Response:
        task_id = request.path_params["task_id"]
        stored = await client._stored_outcome(task_id)
        if stored is None:
            return JSONResponse({"task_id": task_id, "state": "unknown or running", "outcome": None})
        event = believed(client, *stored)
        if event is None:
            return _error(502, "unverified", "the stored outcome did not verify against the trust bundle")
        return JSONResponse({"task_id": task_id, "state": event.data["type"], "outcome": event.data})

    async def cancel(self, request: Request, user: User, client: TenantClient) -> Response:
        body = await self._body(request)
        reason = str(body.get("reason") or f"cancelled by {user.subject}")[:500]
        task_id = request.path_params["task_id"]
        ended = await client.control("cancel", task_id, reason, timeout=5.0)
        state = ended.type if ended is not None else "cancel requested"
        return JSONResponse({"task_id": task_id, "state": state}, status_code=202)

    async def decide(self, request: Request, user: User, client: TenantClient) -> Response:
        """A person's decision on a call of their tenant's task that waits for one."""
        body = await self._body(request)
        approve, comment = body.get("approve"), body.get("comment", "")
        if not isinstance(approve, bool) or not isinstance(comment, str):
            raise BadRequest('"approve" is true or false, "comment" a string')
        approver = self.tenants.approver(user.tenant, user.subject)
        task_id, approval_id = request.path_params["task_id"], request.path_params["approval_id"]
        waiting = await approver.get(approval_id)
        if waiting is None or (waiting["tenant"], waiting["task_id"]) != (user.tenant, task_id):
            raise NotFound(f"task {task_id} has no approval {approval_id}")
        record = await approver.decide(approval_id, approve, comment[:2000])
        return JSONResponse({k: record.get(k) for k in ("approval_id", "status", "decided_by", "comment")})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(self, request: Request) -> Response:
        ok = self.nc.is_connected
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def app(self) -> Starlette:
        routes: list[Route | Mount] = [
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/v1/tasks", self.guarded(self.submit), methods=["POST"]),
            Route("/v1/tasks/{task_id}", self.guarded(self.status), methods=["GET"]),
            Route("/v1/tasks/{task_id}/events", self.guarded(self.events), methods=["GET"]),
            Route("/v1/tasks/{task_id}/cancel", self.guarded(self.cancel), methods=["POST"]),
            Route("/v1/tasks/{task_id}/approvals/{approval_id}", self.guarded(self.decide), methods=["POST"]),
        ]
        if self.settings.static_dir is not None:
            routes.append(Mount("/", StaticFiles(directory=self.settings.static_dir, html=True)))
        middleware = []
        if self.settings.cors_origins:
            middleware.append(Middleware(
                CORSMiddleware, allow_origins=self.settings.cors_origins, allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type", "idempotency-key", "last-event-id"],
            ))  # fmt: skip
        return Starlette(routes=routes, middleware=middleware)
