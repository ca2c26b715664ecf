"""An orders MCP server reached over the network: the example server the tool-executor calls remotely.

Run it as ``python -m mesh_tool_executor.mcp_servers.orders --port 8731 [--host H] [--replica NAME]``.
It speaks MCP's streamable HTTP transport at ``/mcp`` (uvicorn) and prints one line,
``orders MCP server listening on http://HOST:PORT/mcp (replica NAME)``, to stderr once it
accepts connections (``--port 0`` picks a free port; the line names the real one). SIGTERM
stops it cleanly.

Several replicas (separate processes) may serve one state file (``MESH_ORDERS_STATE``; default:
a file in the temp directory). Every read-modify-write of it holds an ``fcntl`` lock on a file
beside it, and a write replaces the file whole (write, then rename), so replicas never see a
half-written state and never lose each other's updates.

``refund_order`` is the write tool the tests need to show at-most-once behaviour from outside:

- The caller supplies ``idempotency_key``; a second call with a key already recorded returns the
  recorded refund and says it is a replay: a retry, to this replica or another, refunds once.
- It records a "started" marker in ``in_progress``, then the refund itself in ``refunds`` (each
  under the lock; the refund is written only if its key is still unknown, so two racing calls
  with one key refund once), then sleeps ``MESH_ORDERS_DELAY_S`` seconds and only then removes
  the marker and answers. A test killing the replica during that sleep leaves the effect done
  and the marker present: exactly "it ran, the caller never heard".

Authentication, when configured, is a small ASGI layer in front of the SDK's app:

- ``MESH_ORDERS_TOKEN_FILE``: every request must carry ``Authorization: Bearer <the file's
  content>``; the file is re-read on every request, so a test can rotate the token.
- ``MESH_ORDERS_OAUTH=1``: ``POST /oauth/token`` runs the client-credentials grant (RFC 6749
  4.4; the client authenticates with HTTP Basic, ``MESH_ORDERS_CLIENT_ID`` and the secret in
  ``MESH_ORDERS_CLIENT_SECRET_FILE``) and issues opaque tokens valid for 300 s, which ``/mcp``
  then accepts. They live in this process's memory: one replica per OAuth test.
- Anything else gets HTTP 401 with ``WWW-Authenticate: Bearer``.

``MESH_ORDERS_DESCRIPTIONS`` names a JSON file ``{tool: description}`` read on every
``tools/list``: a test changes what a tool says about itself while the server runs (a "rug
pull"). ``MESH_ORDERS_TEST_TOOLS=1`` adds ``big(megabytes)`` and ``slow(seconds)`` for the tests
of response limits and timeouts.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import fcntl
import hmac
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import unquote

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import Tool as MCPTool
from mcp.types import ToolAnnotations
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

OrderId = Annotated[str, Field(pattern=r"^o-[0-9]{1,9}$", description="Order id, e.g. 'o-1'")]
Amount = Annotated[float, Field(gt=0, le=1_000_000, description="Amount to refund")]
IdempotencyKey = Annotated[
    str,
    Field(
        pattern=r"^[A-Za-z0-9_.:-]{1,200}$",
        description="supplied by the caller; a retry with the same key is the same refund",
    ),
]

TOKEN_TTL_S = 300
_DEFAULT_ORDERS = 9
_REPLICA = {"name": "orders"}  # set from --replica before the server starts


def state_path() -> Path:
    return Path(os.environ.get("MESH_ORDERS_STATE") or Path(tempfile.gettempdir()) / "mesh-orders-state.json")


def _initial_state() -> dict[str, Any]:
    orders = {f"o-{i}": {"id": f"o-{i}", "amount": 100, "currency": "EUR"} for i in range(1, _DEFAULT_ORDERS + 1)}
    return {"orders": orders, "refunds": [], "in_progress": []}


@contextmanager
def _locked_state(*, write: bool = True) -> Iterator[dict[str, Any]]:
    """The shared state, locked against every other replica and thread; saved if ``write`` and the block ends well."""
    path = state_path()
    # A lock file beside the state, not the state itself: the state is replaced by rename, and a
    # lock on the old inode would not exclude a process that opened the new one.
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one open per call: flock excludes threads of this process too
        try:
            state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            state = _initial_state()
        yield state
        if not write:
            return
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)


def _order(state: dict[str, Any], order_id: str) -> dict[str, Any]:
    order = state["orders"].get(order_id)
    if order is None:
        raise ToolError(f"no order {order_id}")
    return dict(order)


def _recorded(state: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((r for r in state["refunds"] if r["key"] == key), None)


def _start_refund(order_id: str, amount: float, key: str) -> dict[str, Any] | None:
    """The recorded refund if the key is known; otherwise checks the order and marks the refund started."""
    with _locked_state() as state:
        if (done := _recorded(state, key)) is not None:
            return done
        order = _order(state, order_id)
        refunded = sum(r["amount"] for r in state["refunds"] if r["order_id"] == order_id)
        if amount > order["amount"] - refunded:
            raise ToolError(f"refund of {amount:g} exceeds what is left of {order_id} ({order['amount'] - refunded:g})")
        state["in_progress"].append({"key": key, "replica": _REPLICA["name"], "pid": os.getpid()})
        return None


def _record_refund(order_id: str, amount: float, key: str) -> tuple[dict[str, Any], bool]:
    """(the refund, whether it was already recorded): a call racing us with the same key may have won."""
    with _locked_state() as state:
        if (done := _recorded(state, key)) is not None:
            return done, True
        refund = {"key": key, "order_id": order_id, "amount": amount, "replica": _REPLICA["name"], "pid": os.getpid()}
        state["refunds"].append(refund)
        return refund, False


def _finish_refund(key: str) -> None:
    with _locked_state() as state:
        state["in_progress"] = [m for m in state["in_progress"] if not (m["key"] == key and m["pid"] == os.getpid())]


class OrdersServer(MCPServer):
    """The SDK's server, with tool descriptions an operator (or a test) can override while it runs."""

    async def list_tools(self) -> list[MCPTool]:
        tools = await super().list_tools()
        path = os.environ.get("MESH_ORDERS_DESCRIPTIONS")
        if not path:
            return tools
        try:
            overrides = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return tools
        if not isinstance(overrides, dict):
            return tools
        return [
            t.model_copy(update={"description": overrides[t.name]}) if isinstance(overrides.get(t.name), str) else t
            for t in tools
        ]


server: OrdersServer = OrdersServer("orders", instructions="Orders and refunds", log_level="WARNING")


@server.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
def get_order(order_id: OrderId) -> dict[str, Any]:
    """Read one order."""
    with _locked_state(write=False) as state:
        return _order(state, order_id)


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True))
async def refund_order(order_id: OrderId, amount: Amount, idempotency_key: IdempotencyKey) -> dict[str, Any]:
    """Refund (part of) an order. Retrying with the same idempotency_key never refunds twice."""
    done = await anyio.to_thread.run_sync(_start_refund, order_id, amount, idempotency_key)
    if done is not None:
        return {"status": "replay", "refund": done}
    refund, replay = await anyio.to_thread.run_sync(_record_refund, order_id, amount, idempotency_key)
    # After the effect, before the answer: the window a test kills the replica in.
    await anyio.sleep(float(os.environ.get("MESH_ORDERS_DELAY_S") or 0))
    await anyio.to_thread.run_sync(_finish_refund, idempotency_key)
    return {"status": "replay" if replay else "refunded", "refund": refund}


async def big(megabytes: Annotated[int, Field(ge=0, le=1024)]) -> str:
    """A text of that many MiB (test servers only)."""
    return "x" * (megabytes * 1024 * 1024)


async def slow(seconds: Annotated[float, Field(ge=0, le=600)]) -> str:
    """Sleep, then answer (test servers only)."""
    await anyio.sleep(seconds)
    return f"slept {seconds}s"


if os.environ.get("MESH_ORDERS_TEST_TOOLS") == "1":  # the same switch as the admin server's
    server.add_tool(big, annotations=ToolAnnotations(read_only_hint=True))
    server.add_tool(slow, annotations=ToolAnnotations(read_only_hint=True))


class AuthGate:
    """ASGI layer in front of the SDK's app: bearer tokens on ``/mcp``, and the OAuth token endpoint."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.token_file = os.environ.get("MESH_ORDERS_TOKEN_FILE") or None
        self.oauth = os.environ.get("MESH_ORDERS_OAUTH") == "1"
        self.issued: dict[str, float] = {}  # OAuth access token -> monotonic expiry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: the SDK's session manager starts there
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        if self.oauth and scope["path"] == "/oauth/token":
            await (await self._token(request))(scope, receive, send)
        elif (self.token_file or self.oauth) and not self._accepted(request.headers.get("authorization", "")):
            response = JSONResponse(
                {"error": "invalid_token"}, status_code=401, headers={"WWW-Authenticate": 'Bearer realm="orders"'}
            )
            await response(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _accepted(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        if self.token_file:
            try:
                expected = Path(self.token_file).read_text(encoding="utf-8").strip()
            except OSError:
                expected = ""
            if expected and hmac.compare_digest(token.encode(), expected.encode()):
                return True
        expiry = self.issued.get(token)
        return expiry is not None and expiry > time.monotonic()

    async def _token(self, request: Request) -> Response:
        if request.method != "POST":
            return JSONResponse({"error": "invalid_request"}, status_code=405)
        form = await request.form()
        if form.get("grant_type") != "client_credentials":
            return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)
        if not self._client_ok(request.headers.get("authorization", "")):
            return JSONResponse(
                {"error": "invalid_client"}, status_code=401, headers={"WWW-Authenticate": 'Basic realm="orders"'}
            )
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        self.issued = {t: e for t, e in self.issued.items() if e > now}
        self.issued[token] = now + TOKEN_TTL_S
        body = {"access_token": token, "token_type": "Bearer", "expires_in": TOKEN_TTL_S}
        scope = form.get("scope")
        if isinstance(scope, str) and scope:
            body["scope"] = scope
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @staticmethod
    def _client_ok(header: str) -> bool:
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            client_id, _, secret = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        client_id, secret = unquote(client_id), unquote(secret)  # RFC 6749 2.3.1: form-encoded before Basic
        secret_file = os.environ.get("MESH_ORDERS_CLIENT_SECRET_FILE")
        try:
            expected = Path(secret_file).read_text(encoding="utf-8").strip() if secret_file else ""
        except OSError:
            expected = ""
        wanted_id = os.environ.get("MESH_ORDERS_CLIENT_ID", "")
        return bool(wanted_id and expected) and (
            hmac.compare_digest(client_id.encode(), wanted_id.encode())
            & hmac.compare_digest(secret.encode(), expected.encode())
        )


class _Uvicorn(uvicorn.Server):
    """uvicorn, announcing the address once it accepts connections (tests wait for that line)."""

    def __init__(self, config: uvicorn.Config, *, scheme: str, replica: str) -> None:
        super().__init__(config)
        self.scheme = scheme
        self.replica = replica

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn's own re-raises the signal once shut down, so a stop that was asked for and done
        # would exit as "killed by SIGTERM"; here it exits 0.
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            print(
                f"orders MCP server listening on {self.scheme}://{shown}:{port}/mcp (replica {self.replica})",
                file=sys.stderr,
                flush=True,
            )


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: it ends up in the log of whoever started us.
        self.exit(2, f"orders: {message} (see --help)\n")


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = _Parser(prog="python -m mesh_tool_executor.mcp_servers.orders", description="An orders MCP server.")
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free port)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--replica", default="orders", help="name recorded with each refund")
    parser.add_argument("--tls-cert", help="PEM certificate (chain): serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--json-response", action="store_true", help="answer with JSON bodies instead of SSE")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in 0..65535, got {args.port}")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if not args.replica or len(args.replica) > 64:
        parser.error("--replica must be 1 to 64 characters")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    _REPLICA["name"] = args.replica
    app = server.streamable_http_app(streamable_http_path="/mcp", json_response=args.json_response, host=args.host)
    config = uvicorn.Config(
        AuthGate(app),
        host=args.host,
        port=args.port,
        log_level="warning",
        ssl_certfile=args.tls_cert,
        ssl_keyfile=args.tls_key,
        # Open SSE streams would otherwise hold a SIGTERM for as long as clients stay connected.
        timeout_graceful_shutdown=3,
    )
    uv = _Uvicorn(config, scheme="https" if args.tls_cert else "http", replica=args.replica)
    uv.run()
    if not uv.started:
        sys.exit(1)  # uvicorn has logged why (e.g. the port is taken)


if __name__ == "__main__":
    main()
