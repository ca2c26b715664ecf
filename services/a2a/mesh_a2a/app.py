"""The gateway's HTTP surface: per tenant and agent, a card and a JSON-RPC endpoint (the SDK's).

    GET  /a2a/{tenant}                                       the tenant's agents and their cards' URLs
    GET  /a2a/{tenant}/{agent}/.well-known/agent-card.json   the agent's card
    POST /a2a/{tenant}/{agent}                               A2A JSON-RPC: SendMessage, SendStreamingMessage,
                                                             GetTask, CancelTask, SubscribeToTask, the push
                                                             notification configs (and the 0.3 names:
                                                             message/send, message/stream, tasks/get, ...)
    GET  /healthz, /readyz

Every call but the health checks carries ``Authorization: Bearer <token>``, and the token's tenant
is the path's: 401 without a valid token, 403 for another tenant's (or one this gateway does not
serve), 404 for an agent the tenant does not expose; each with ``{"error": code, "message": one
line}``, as the edge answers. A card is served to the tenant's callers only: it lists what the
tenant runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryPushNotificationConfigStore
from nats.aio.client import Client as NATS
from opentelemetry import propagate, trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mesh_a2a.callers import SCOPE, Caller, Contexts, Gate, caller_of
from mesh_a2a.cards import card, endpoint, template
from mesh_a2a.errors import NotExposed
from mesh_a2a.executor import MeshExecutor, can_decide
from mesh_a2a.exposed import MESH, exposed
from mesh_a2a.handler import Handler
from mesh_a2a.push import Sender, url_check
from mesh_a2a.settings import A2aSettings
from mesh_a2a.store import MeshTaskStore
from mesh_edge.tenants import Tenants
from mesh_edge.users import Forbidden, Unauthorized, Users
from mesh_kit.telemetry import A_TENANT, Telemetry, setup

log = logging.getLogger("mesh.a2a")

M_REQUESTS = "mesh.a2a.requests"
CARD = "/a2a/{tenant}/{agent}/.well-known/agent-card.json"
RPC = "/a2a/{tenant}/{agent}"

Endpoint = Callable[[Request], Awaitable[Response]]


def _error(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": 'Bearer realm="agentmesh-a2a"'} if status == 401 else None
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


class Gateway:
    def __init__(
        self, settings: A2aSettings, nc: NATS, gate: Gate, handler: Handler, sender: Sender,
        telemetry: Telemetry | None = None,
    ) -> None:  # fmt: skip
        self.settings, self.nc, self.gate, self.handler, self.sender = settings, nc, gate, handler, sender
        self.telemetry = telemetry or setup("a2a")
        self.tracer = self.telemetry.tracer_provider.get_tracer("mesh_a2a")
        meter = self.telemetry.meter_provider.get_meter("mesh_a2a")
        self.m_requests = meter.create_counter(M_REQUESTS, description="A2A calls, by route and HTTP status")

    def guarded(self, inner: Endpoint, agent: str | None = None) -> Endpoint:
        """``inner`` for a signed-in caller of the path's tenant and an agent it exposes (``agent``:
        that one, not the path's); every refusal in one line."""

        async def guard(request: Request) -> Response:
            route = request.scope["route"].path if "route" in request.scope else request.url.path
            parent = propagate.extract(dict(request.headers))  # a caller that traces: its task joins the trace
            with self.tracer.start_as_current_span(f"{request.method} {route}", context=parent,
                                                   kind=trace.SpanKind.SERVER) as span:  # fmt: skip
                try:
                    caller = await self.gate.caller(
                        request.headers.get("authorization"), request.path_params["tenant"],
                        agent or request.path_params["agent"],
                    )  # fmt: skip
                    span.set_attributes({A_TENANT: caller.tenant, "enduser.id": caller.subject})
                    request.scope[SCOPE] = caller
                    response = await inner(request)
                except Unauthorized as exc:
                    response = _error(401, "unauthorized", str(exc))
                except Forbidden as exc:
                    response = _error(403, "forbidden", str(exc))
                except NotExposed as exc:
                    response = _error(404, "not_found", str(exc))
                span.set_attribute("http.response.status_code", response.status_code)
                self.m_requests.add(1, {"http.route": route, "http.response.status_code": response.status_code})
                return response

        return guard

    def base(self, request: Request) -> str:
        return (self.settings.public_url or str(request.base_url)).rstrip("/")

    async def card(self, request: Request) -> Response:
        caller: Caller = request.scope[SCOPE]
        served = card(self.base(request), caller.tenant, caller.agent)
        # the SDK's card endpoint (its ETag, If-None-Match), for this agent's card
        answer: Response = await create_agent_card_routes(served, card_url=request.url.path)[0].endpoint(request)
        return answer

    async def agents(self, request: Request) -> Response:
        caller: Caller = request.scope[SCOPE]
        base = self.base(request)
        found = await exposed(caller.client)
        return JSONResponse({"tenant": caller.tenant, "agents": [
            {"name": a.name, "kind": a.kind, "description": a.description, "version": a.version,
             "card": endpoint(base, caller.tenant, a.name) + "/.well-known/agent-card.json"}
            for a in found.values()
        ]})  # fmt: skip

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def readyz(self, request: Request) -> Response:
        ok = self.nc.is_connected
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    def app(self) -> Starlette:
        rpc = create_jsonrpc_routes(self.handler, RPC, context_builder=Contexts(), enable_v0_3_compat=True)[0]
        return Starlette(routes=[
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/a2a/{tenant}", self.guarded(self.agents, MESH), methods=["GET"]),
            Route(CARD, self.guarded(self.card), methods=["GET"]),
            Route(RPC, self.guarded(rpc.endpoint), methods=["POST"]),
        ])  # fmt: skip

    async def close(self) -> None:
        """Stop following (the mesh's tasks run on) and close the webhook client."""
        await self.handler.aclose()
        await self.sender.aclose()


def gateway(settings: A2aSettings, nc: NATS, users: Users, telemetry: Telemetry | None = None) -> Gateway:
    """The gateway, assembled: the edge's tenant identities over ``nc``, the executor, the mesh as
    the task store, push configs held by the replica that took them (it follows their tasks)."""
    tenants = Tenants(settings.as_edge(), nc)
    store = MeshTaskStore(lambda caller: can_decide(tenants, caller))
    executor = MeshExecutor(settings, tenants, store)
    configs = InMemoryPushNotificationConfigStore(owner_resolver=lambda context: caller_of(context).owner)
    check = url_check(settings.push_allowed_hosts)
    sender = Sender(configs, check)
    handler = Handler(executor, store, template(settings.public_url or "http://localhost"), configs, sender, check,
                      settings.max_tasks_per_user)  # fmt: skip
    return Gateway(settings, nc, Gate(users, tenants), handler, sender, telemetry)
