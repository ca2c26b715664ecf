"""``meshctl dashboard``: the live view of ``meshctl top`` and any task's timeline, in a browser.

Read-only, unless started as a reviewer (below). One process holding the admin's NATS connection gathers a frame every few seconds
(the same ``top.gather``: per tenant tasks in flight / done / failed / refused, approvals
waiting and spend; per service backlog, in flight and rate; spend by model; breaker trips; dead
letters) and serves it with a page that renders it; a task's timeline is its ``meshctl trace``
(every stored message in causal order, each hop's delay) with the ``meshctl history`` totals.

Authenticated with an operator identity: every request carries a statement signed with the
admin's signing key (``typ: dashboard``, hours-long), verified against the trust bundle like
every signature of the mesh. ``meshctl dashboard`` prints a URL holding a fresh one; the page
moves it into an HttpOnly, SameSite=Strict cookie and drops it from the address bar. Nothing
else gets in: no statement, a statement signed by any other principal, an expired one, or one
of another kind is a 401. The page loads no third-party code (a strict Content-Security-Policy),
and renders every value as text.

**Reviewing** (``meshctl dashboard --as approver.<tenant>.<person>``): the process also holds that
approver's key, and a task waiting for a reviewer (a draft plan, a workflow's approval node) of the
approver's tenant shows approve / reject (and, for a draft, its steps as JSON to edit), which
``POST /api/review`` sends exactly as ``meshctl review`` does (``meshctl.review.decide``: signed with the approver's key, judged by the planner
under the newest trust bundle, on the audit chain) and answers with its effect. Only that one
POST exists, and only for a signed-in session: the cookie is SameSite=Strict (another site's page
cannot send it), the request must be JSON (a cross-site form cannot be) from this page's own
origin, and its body is at most ``MAX_BODY`` bytes. Without ``--as`` it is read-only.

**Releases** (``GET /api/releases?tenant=T``, issue 41): the tenant's release channel as the
planner keeps it (KV ``releases``, key ``<tenant>.channel``), with what the page plots computed
here (``releases_view``): the sequential test's boundaries, each version's signals during the
last canary, the canary's log-likelihood ratio after each of its tasks, each version's cumulative
bad rate, mean cost and p95 latency over time, and the decision that ended the canary.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

import nats
import nats.js.errors
from nats.aio.client import Client as NATS
from pydantic import ValidationError

from mesh_contracts.v1.records import ArmStats, ReleaseChannel, ReleaseEvent
from mesh_contracts.v1.release import CanaryTest
from mesh_identity import OPERATOR_ROLES, IdentityError, Signer, Verifier
from meshctl import history, top
from meshctl import review as rv
from meshctl import trace as tr
from meshctl.dag import task_dag
from meshctl.local import MeshError

log = logging.getLogger("meshctl.dashboard")

KIND = "dashboard"
TOKEN_TTL_S = 8 * 3600.0
MAX_BODY = 256 * 1024
"""The largest request body (a review decision, an edited plan with it) the dashboard reads."""
COOKIE = "mesh_dashboard"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_STATIC = {"/app.js": "application/javascript", "/app.css": "text/css", "/": "text/html"}
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def sign_in(signer: Signer, ttl_s: float = TOKEN_TTL_S) -> str:
    """A dashboard statement from ``signer`` (the admin's key)."""
    return signer.statement(KIND, {"use": KIND}, ttl_s=ttl_s)


class Dashboard:
    def __init__(
        self,
        connect: Callable[[], Awaitable[NATS]],
        verifier: Verifier,
        *,
        health: dict[str, str] | None = None,
        budget: top.Asker | None = None,
        interval_s: float = 2.0,
        host: str = "127.0.0.1",
        port: int = 0,
        reviewer: Any = None,
    ) -> None:
        self._connect, self.verifier, self.health, self.budget = connect, verifier, health or {}, budget
        self.reviewer = reviewer
        """A ``meshctl.approver.Approver``, entered (``--as``): the person this dashboard decides as."""
        self.interval_s, self.host, self.port = interval_s, host, port
        self.nc: NATS | None = None
        self.frame: top.Frame | None = None
        self.frames = 0
        self._server: asyncio.base_events.Server | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._stopping = False
        self.denied = 0

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> int:
        self.nc = await self._connect()
        self.frame = await top.gather(self.nc, None, self.health, self.budget)
        self.frames = 1
        self._refresher = asyncio.create_task(self._refresh())
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        self._stopping = True
        if self._refresher is not None:
            # Cancelled until it is done: Python 3.11's ``wait_for`` (inside nats-py's requests) can
            # swallow a cancellation that lands as its inner call completes, and the loop then went
            # on; the dashboard test's teardown hung 180 s that way on a loaded machine.
            while not self._refresher.done():
                self._refresher.cancel()
                await asyncio.wait({self._refresher}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                self._refresher.result()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self.nc is not None:
            await self.nc.close()

    async def _refresh(self) -> None:
        while not self._stopping:
            await asyncio.sleep(self.interval_s)
            try:
                assert self.nc is not None
                self.frame = await top.gather(self.nc, self.frame, self.health, self.budget)
                self.frames += 1
            except Exception as exc:  # noqa: BLE001 - a bad look keeps the last frame; the page shows its age
                log.warning("could not gather a frame: %s", exc)

    # --- HTTP -----------------------------------------------------------------------------------

    def authorised(self, token: str | None) -> str | None:
        """The operator's name when ``token`` is a valid, unexpired dashboard statement."""
        if not token:
            return None
        try:
            principal, claims = self.verifier.statement(token, kind=KIND, roles=OPERATOR_ROLES, require=["exp", "use"])
        except IdentityError:
            return None
        if claims.get("use") != KIND or float(claims["exp"]) < time.time():
            return None
        return principal.name

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            headers: dict[str, str] = {}
            while True:
                h = await asyncio.wait_for(reader.readline(), 5)
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
                if len(headers) > 100:
                    break
            parts = line.decode("latin-1").split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "/")
            try:
                length = int(headers.get("content-length", "0") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY:
                code, ctype, body, extra = _json(413, {"error": f"a request body is at most {MAX_BODY} bytes"})
            else:
                sent = await asyncio.wait_for(reader.readexactly(length), 5) if length else b""
                code, ctype, body, extra = await self.route(method, target, headers, sent)
            head = {"Content-Type": ctype, "Content-Length": str(len(body)), "Connection": "close", **_HEADERS, **extra}
            reason = {200: "OK", 302: "Found", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                      404: "Not Found", 405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
                      415: "Unsupported Media Type", 503: "Service Unavailable"}.get(code, "Error")  # fmt: skip
            writer.write(
                f"HTTP/1.1 {code} {reason}\r\n".encode()
                + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
                + b"\r\n"
                + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def route(
        self, method: str, target: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, str, bytes, dict[str, str]]:
        url = urlsplit(target)
        if method != "GET" and not (method == "POST" and url.path == "/api/review"):
            return _json(405, {"error": "read-only: GET only (and POST /api/review for a reviewer)"})
        query = parse_qs(url.query)
        tokens = query.get("token")
        offered = tokens[0] if tokens else None
        if offered is not None:  # the printed URL: keep the statement in a cookie, not in the address bar
            if self.authorised(offered) is None:
                self.denied += 1
                return _json(401, {"error": "that sign-in statement is not valid (run meshctl dashboard again)"})
            cookie = f"{COOKIE}={offered}; HttpOnly; SameSite=Strict; Path=/; Max-Age={int(TOKEN_TTL_S)}"
            return 302, "text/plain", b"", {"Location": url.path or "/", "Set-Cookie": cookie}
        bearer = headers.get("authorization", "")
        token = bearer[7:] if bearer.lower().startswith("bearer ") else None
        if token is None and "cookie" in headers:
            jar: SimpleCookie = SimpleCookie()
            with contextlib.suppress(Exception):
                jar.load(headers["cookie"])
            token = jar[COOKIE].value if COOKIE in jar else None
        if self.authorised(token) is None:
            self.denied += 1
            return _json(401, {"error": "sign in with the URL `meshctl dashboard` prints (an operator's statement)"})
        if method == "POST":
            return await self._review(headers, body)
        if url.path in _STATIC:
            name = "index.html" if url.path == "/" else url.path[1:]
            return 200, f"{_STATIC[url.path]}; charset=utf-8", _asset(name), {}
        if url.path == "/api/frame":
            assert self.frame is not None
            return _json(200, {**self.frame.as_json(), "age_s": round(time.time() - self.frame.at, 1),
                               "interval_s": self.interval_s})  # fmt: skip
        if url.path == "/api/task":
            tenant, task = (query.get("tenant") or [""])[0], (query.get("task") or [""])[0]
            if not (_NAME.fullmatch(tenant) and _NAME.fullmatch(task)):
                return _json(400, {"error": "tenant and task: letters, digits, _ and -"})
            return await self._task(tenant, task)
        if url.path == "/api/releases":
            tenant = (query.get("tenant") or [""])[0]
            if not _NAME.fullmatch(tenant):
                return _json(400, {"error": "tenant: letters, digits, _ and -"})
            return await self._releases(tenant)
        return _json(404, {"error": f"no route {url.path}"})

    async def _releases(self, tenant: str) -> tuple[int, str, bytes, dict[str, str]]:
        """The tenant's release channel (nothing drafted: an empty one) and what the page plots."""
        assert self.nc is not None
        try:
            stored = await self.nc.jetstream(timeout=5.0).get_last_msg(
                "KV_releases", f"$KV.releases.{ReleaseChannel.key(tenant)}", direct=True
            )
        except nats.js.errors.NotFoundError:
            stored = None
        except (nats.errors.Error, TimeoutError) as exc:
            return _json(503, {"error": f"could not read {tenant}'s release channel: {exc!r}"})
        found: dict[str, Any] = {"tenant": tenant}
        if stored is not None and stored.data and (stored.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
            found = json.loads(stored.data)
        try:
            ch = ReleaseChannel.model_validate(found)
        except ValidationError as exc:
            return _json(
                503, {"error": f"{tenant}'s release channel does not read as one: {exc.error_count()} problem(s)"}
            )
        return _json(200, releases_view(ch))

    async def _task(self, tenant: str, task: str) -> tuple[int, str, bytes, dict[str, str]]:
        assert self.nc is not None
        stored = await history.collect(self.nc, tenant, task)
        h = history.build(tenant, task, stored, self.verifier)
        if not h.entries:
            return _json(404, {"error": f"no stored message about {tenant}/{task}"})
        t = tr.from_history(h, {(stream, s.seq): s.headers for stream, s in stored})
        dag = task_dag(h)
        return _json(200, {"trace": tr.messages_json(t), "totals": h.totals(), "dag": dag,
                           "review": await self._waits_for(tenant, task, dag)})  # fmt: skip

    # --- reviewing (``--as``) -------------------------------------------------------------------

    def _reviews(self, tenant: str) -> bool:
        """Whether this dashboard decides for ``tenant`` (its approver's; the console's: any)."""
        return self.reviewer is not None and self.reviewer.tenant in (None, tenant)

    async def _waits_for(self, tenant: str, task: str, dag: dict[str, Any] | None) -> dict[str, Any] | None:
        """What of the task waits for a reviewer now (an approval node, else its draft), and who
        here may decide it; None when nothing does."""
        assert self.nc is not None
        if dag is None or not (dag["draft"] or any(n["state"] == "waiting" for n in dag["nodes"])):
            return None  # (nothing that waits for a person: no reads)
        who = {"reviewer": self.reviewer.name if self._reviews(tenant) else None}
        try:
            w, draft, state = await rv.pending(self.nc, tenant, task)
        except MeshError:
            return None
        if w is not None:
            return {**who, "kind": "approval", "node": w.step_id, "id": w.decision, "request": w.request}
        if draft is None or state:
            return None
        return {**who, "kind": "draft", "id": draft.draft, "revision": draft.revision, "steps": len(draft.steps),
                "edited_by": draft.edited_by, "plan": [s.model_dump(mode="json", exclude_defaults=True)
                                                       for s in draft.steps]}  # fmt: skip

    async def _review(self, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes, dict[str, str]]:
        """``POST /api/review`` ``{"tenant", "task", "decision": "approve"|"reject"|"edit", "comment",
        "steps"}`` (``steps``: an edit's plan, as ``meshctl review edit --plan`` takes it)."""
        if self.reviewer is None:
            return _json(403, {"error": "this dashboard is read-only: start it with --as approver.<tenant>.<person> "
                                        "to review from it"})  # fmt: skip
        if headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _json(415, {"error": "a review is sent as application/json"})
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != headers.get("host", ""):
            return _json(403, {"error": f"a review comes from this dashboard's own page, not from {origin}"})
        try:
            asked = json.loads(body)
            tenant, task, decision = str(asked["tenant"]), str(asked["task"]), str(asked["decision"])
            comment = str(asked.get("comment") or "")[:2000]
            steps = rv.plan_steps(asked["steps"]) if decision == "edit" else ()
        except MeshError as exc:
            return _json(400, {"error": str(exc)})
        except (ValueError, KeyError, TypeError):
            return _json(400, {"error": 'expected {"tenant", "task", "decision": "approve", "reject" or "edit", '
                                        '"comment", "steps" (an edit)}'})  # fmt: skip
        if not (_NAME.fullmatch(tenant) and _NAME.fullmatch(task)) or decision not in ("approve", "reject", "edit"):
            return _json(400, {"error": "tenant and task: letters, digits, _ and -; decision: approve, reject or edit"})
        if not self._reviews(tenant):
            return _json(403, {"error": f"{self.reviewer.name} reviews for {self.reviewer.tenant} only"})
        assert self.nc is not None
        try:
            code, said = await rv.decide(self.nc, self.reviewer, tenant, task, decision, steps=steps, comment=comment)
        except MeshError as exc:
            return _json(409, {"error": str(exc)})
        log.info("%s %s %s/%s from the dashboard: %s", self.reviewer.name, decision, tenant, task, said)
        return _json(200 if code == 0 else 409, {"code": code, "message": said, "by": self.reviewer.name})


# --- releases (pure: what ``GET /api/releases`` answers) --------------------------------------------


def _arm(arm: ArmStats, role: str) -> dict[str, Any]:
    n = arm.tasks
    return {
        "role": role,
        "tasks": n,
        "bad": arm.bad,
        "bad_rate": arm.bad / n if n else None,
        "checks_passed_rate": arm.checks_passed / n if n else None,
        "judge_mean": arm.judge_sum / arm.judge_n if arm.judge_n else None,
        "mean_cost_usd": arm.mean_cost(),
        "p95_latency_s": arm.p95(),
        "tool_denials": arm.tool_denials,
    }


def _last_canary(ch: ReleaseChannel) -> tuple[str, ReleaseEvent | None]:
    """The version of the running canary, else of the last one (with the event that started it)."""
    started = next((e for e in reversed(ch.history) if e.action == "canary"), None)
    if ch.canary:
        return ch.canary, started if started is not None and started.version == ch.canary else None
    return (started.version, started) if started is not None else ("", None)


def _baseline(ch: ReleaseChannel, canary: str) -> str:
    """The version the canary ran against: the other arm observed, else the current one then."""
    others = [v for v in ch.arms if v != canary]
    if others:
        return others[0]
    if not ch.canary and ch.current == canary:  # promoted since: the one current before it
        return ch.before[-1] if ch.before else ""
    return ch.current


def releases_view(ch: ReleaseChannel) -> dict[str, Any]:
    """What the page shows of a tenant's releases: the channel, the test's boundaries, each arm's
    signals, the canary's log-likelihood ratio after each of its observations (``llr``: ``n`` is
    the canary's task count then; ``n`` 0 is the origin, when the trail holds the canary's first
    task), per version the cumulative bad rate, mean cost and p95 latency after each of its tasks
    (``series``; ``t_s``: seconds since the canary began), and the decision that ended the last
    canary (``decision``, None while it runs or when a person ended it otherwise)."""
    test = ch.test or CanaryTest()
    lower, upper = test.boundaries()
    canary, started = _last_canary(ch)
    baseline = _baseline(ch, canary) if canary else ch.current
    arms: dict[str, dict[str, Any]] = {}
    for version, arm in ch.arms.items():
        role = "canary" if version == canary else ("current" if version == baseline else "other")
        arms[version] = _arm(arm, role)

    observed = [p for p in ch.trail if p.version == canary] if canary else []
    tasks = ch.arms[canary].tasks if canary in ch.arms else len(observed)
    first = max(0, tasks - len(observed))  # the canary tasks the kept trail no longer holds
    llr: list[dict[str, Any]] = []
    if observed and first == 0:
        llr.append({"n": 0, "llr": 0.0, "at": ch.canary_since, "bad": False})
    llr += [{"n": first + i + 1, "llr": p.llr, "at": p.at, "bad": p.bad} for i, p in enumerate(observed)]

    series: dict[str, list[dict[str, Any]]] = {}
    sums: dict[str, list[float]] = {}  # version -> [tasks, bad, cost]
    latencies: dict[str, list[float]] = {}
    for p in ch.trail:
        acc = sums.setdefault(p.version, [0, 0, 0.0])
        acc[0] += 1
        acc[1] += int(p.bad)
        acc[2] += p.cost_usd
        seen = latencies.setdefault(p.version, [])
        bisect.insort(seen, p.latency_s)
        n = int(acc[0])
        series.setdefault(p.version, []).append({
            "at": p.at, "t_s": round(p.at - ch.canary_since, 3), "n": n, "bad": int(acc[1]),
            "bad_rate": acc[1] / n, "mean_cost_usd": acc[2] / n,
            "p95_latency_s": seen[min(n - 1, math.ceil(0.95 * n) - 1)],
        })  # fmt: skip

    decision = None
    last = ch.history[-1] if ch.history else None
    if (
        last is not None
        and canary
        and last.version == canary
        and last.action in ("promoted", "rolled_back", "promote", "rollback")
        and (started is None or last.at >= started.at)
    ):
        done = "promoted" if last.action in ("promoted", "promote") else "rolled back"
        n = last.tasks or (ch.arms[canary].tasks if canary in ch.arms else 0)
        decision = {
            "action": last.action, "version": canary, "by": last.by, "at": last.at, "reason": last.reason,
            "tasks": n, "bad": last.bad, "llr": last.llr if last.tasks else ch.llr,
            "label": f"{done} by {last.by} after {n} canary task{'' if n == 1 else 's'}",
        }  # fmt: skip
    return {
        "tenant": ch.tenant,
        "channel": ch.model_dump(mode="json"),
        "test": test.model_dump(mode="json"),
        "boundaries": {"lower": lower, "upper": upper},
        "canary": canary,
        "baseline": baseline,
        "running": bool(ch.canary),
        "arms": arms,
        "llr": llr,
        "series": series,
        "decision": decision,
    }


def _json(code: int, body: Any) -> tuple[int, str, bytes, dict[str, str]]:
    return code, "application/json", json.dumps(body, default=str).encode(), {}


def _asset(name: str) -> bytes:
    return resources.files("meshctl").joinpath("web", name).read_bytes()
