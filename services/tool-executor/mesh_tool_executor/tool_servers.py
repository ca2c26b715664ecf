"""Tenants' own tool servers: remote MCP servers and external A2A agents mounted per tenant,
offered only once approved.

Every replica follows KV ``toolservers`` (the tenants' server records, ``tool_changes.py`` writes
them) and keeps each server mounted as a ``pool.Pool`` of its endpoints. After each mount and
each health check (every ``MESH_TOOL_SERVER_CHECK_S``) it lists the server's tools and judges each
listed definition against the one a person approved (``ToolServerRecord.pins``):

- ``approved``: listed exactly as pinned: offered to the tenant's tasks as ``<server>__<tool>``;
- ``pending``: never approved: not offered (``meshctl tools list`` shows it, with its hash);
- ``suspended``: approved once, listed differently now: not offered, and the change is put on the
  tenant's audit chain as ``tools.suspended``, naming what changed (description, input schema),
  once per new definition. Approving the new definition offers it again.

Every description is scored by the injection detector when listed; a flagged one is shown as such
and cannot be approved without ``--force``. What the tenant's tasks may use is written as the
tenant's catalogue (``<tenant>.catalogue``), beside the server's state (``<tenant>.state.<name>``:
its tools and each endpoint's health, for ``meshctl tools list``, ``meshctl top`` and the
dashboard). A tenant's tools live in its own registry: another tenant's call to them is a call to
an unknown tool, and they are never in another tenant's catalogue.

An A2A agent (``protocol: a2a``) is mounted the same way, its replicas as ``remote_a2a.A2AEndpoint``
instead of ``remote.Endpoint``: its card's skills are the listed tools (each pinning a digest of the
whole card, so a changed card suspends them all), and from there on everything above applies as is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jsonschema
from opentelemetry import trace

from mesh_contracts.v1.tool_servers import (
    ListedTool,
    TenantToolCatalogue,
    ToolServerRecord,
    ToolServerState,
    definition_hash,
    field_hash,
)
from mesh_durable.chain import Appender
from mesh_durable.tail import Stored, Tail
from mesh_guardrails.injection import score as injection_score
from mesh_host import Mesh
from mesh_tool_executor import arguments as schemas
from mesh_tool_executor import metrics as tool_executor_metrics
from mesh_tool_executor.errors import ToolExecutorError
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_tool_executor.tools import Registry, Tool, ToolContext, ToolError

if TYPE_CHECKING:  # the MCP SDK takes ~1.7 s to import: only a mesh with tenant servers pays it
    from mesh_tool_executor.pool import Pool
    from mesh_tool_executor.remote_a2a import A2AEndpoint

log = logging.getLogger("mesh.tool-executor.servers")

BUCKET = "toolservers"
IDEMPOTENCY_ARG = "idempotency_key"
"""A tool whose input schema takes this argument is given the call's ledger key in it (the model
never sees it): the same key on every replica and retry, so the server itself runs the effect once."""
_MOUNTED_NAME = r"^[A-Za-z0-9_-]{1,64}$"
STATE_EVERY_S = 60.0
"""A server's state is written when it changes, and at least this often (its counts, latencies)."""


class CredentialsRefused(ToolExecutorError):
    """The server refused the tenant's credentials: nothing ran. Not the model's to fix: the task is
    halted (it resumes once someone fixes the secret) instead of failing a step."""

    def __init__(self, message: str, route: Any) -> None:
        super().__init__(message)
        self.route = route


@dataclass
class Mounted:
    """One tenant server as this replica holds it."""

    rec: ToolServerRecord
    pool: Pool | None = None
    digest: str = ""  # of the definition the pool was built from: a change of pins keeps the pool
    state: ToolServerState | None = None
    tools: dict[str, Tool] = field(default_factory=dict)  # approved and callable, by mounted name
    announced: set[str] = field(default_factory=set)  # "<tool>:<sha>" suspensions already on the chain
    listed: tuple[int, list[tuple[str, str]]] | None = None  # (record version, each tool's hash) judged last


class TenantServers:
    """The tenants' servers of this replica: mounted from KV ``toolservers`` and kept listed."""

    def __init__(self, mesh: Mesh, settings: ToolExecutorSettings, audit: Appender) -> None:
        self.mesh, self.settings, self.audit = mesh, settings, audit
        self.kv: Any = None
        self.mounted: dict[tuple[str, str], Mounted] = {}
        self._wanted: dict[tuple[str, str], ToolServerRecord | None] = {}
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._tail: Tail | None = None
        self._registries: dict[str, Registry] = {}
        self._written: dict[tuple[str, str], tuple[str, float]] = {}  # state key -> (its gist, when written)

    # --- what the tool-executor asks ---------------------------------------------------------------

    def tool(self, tenant: str, name: str) -> Tool | None:
        """The tenant's approved tool of this name (None for anyone else's, or a suspended one)."""
        server = name.split("__", 1)[0] if "__" in name else ""
        m = self.mounted.get((tenant, server))
        return m.tools.get(name) if m is not None else None

    def registry(self, tenant: str) -> Registry:
        """The tenant's own tools, to validate its calls against (empty for a tenant without any)."""
        reg = self._registries.get(tenant)
        if reg is None:
            reg = self._registries[tenant] = Registry({})
        return reg

    def states(self) -> list[ToolServerState]:
        return [m.state for m in self.mounted.values() if m.state is not None]

    # --- following the registry --------------------------------------------------------------------

    async def start(self, kv: Any) -> None:
        self.kv = kv
        self._tasks = [
            asyncio.create_task(self._follow(), name="tool-servers-follow"),
            asyncio.create_task(self._reconcile(), name="tool-servers-mount"),
            asyncio.create_task(self._check_loop(), name="tool-servers-check"),
        ]

    async def stop(self) -> None:
        if self._tail is not None:
            await self._tail.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks = []
        for m in list(self.mounted.values()):
            if m.pool is not None:
                await m.pool.close()
        self.mounted.clear()

    async def _follow(self) -> None:
        # Every write of the bucket rings on a core subscription; the tail reads what changed.
        self._tail = Tail(self.mesh.nc, f"KV_{BUCKET}", self._seen, feed=f"$KV.{BUCKET}.>", poll_s=2.0)
        await self._tail.run()

    async def _seen(self, entry: Stored) -> None:
        parts = entry.subject.split(".")  # $KV.toolservers.<tenant>.server.<name>
        if len(parts) != 5 or parts[3] != "server":
            return
        key = (parts[2], parts[4])
        if entry.operation is not None or not entry.data:
            self._wanted[key] = None
        else:
            try:
                self._wanted[key] = ToolServerRecord.from_bytes(entry.data, ToolServerRecord.key(*key))
            except ValueError as exc:
                log.error("tool server record %s/%s unreadable: %s", *key, exc)
                return
        self._changed.set()

    async def _reconcile(self) -> None:
        """Mount what the registry says, one server at a time (a slow server delays the others' mount
        by its connect timeout at most: the tail keeps reading meanwhile)."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            for key, rec in list(self._wanted.items()):
                have = self.mounted.get(key)
                if rec is None:
                    self._wanted.pop(key, None)
                    if have is not None:
                        await self._unmount(key)
                elif have is None or have.rec.version != rec.version:
                    try:
                        await self._mount(rec)
                    except Exception:
                        log.exception("tool server %s/%s not mounted", *key)

    # --- mounting ----------------------------------------------------------------------------------

    async def _mount(self, rec: ToolServerRecord) -> None:
        key = (rec.tenant, rec.server)
        m = self.mounted.get(key)
        digest = field_hash(rec.definition.model_dump(mode="json"))
        if m is None or m.digest != digest:
            if m is not None and m.pool is not None:
                await m.pool.close()
            announced = m.announced if m is not None else set()
            m = self.mounted[key] = Mounted(rec, self._pool(rec), digest, announced=announced)
            log.info("tool server %s/%s mounted (%s): %d endpoint(s)", rec.tenant, rec.server, rec.protocol,
                     len(rec.definition.endpoints))  # fmt: skip
        else:
            m.rec = rec  # pins or rules changed: same endpoints, same sessions
        await self.refresh(m)

    async def _unmount(self, key: tuple[str, str]) -> None:
        m = self.mounted.pop(key, None)
        self._written.pop(key, None)
        if m is None:
            return
        if m.pool is not None:
            await m.pool.close()
        for name in m.tools:
            self.registry(key[0]).tools.pop(name, None)
        await self._publish_catalogue(key[0])
        if self.kv is not None:
            with contextlib.suppress(Exception):
                await self.kv.delete(ToolServerState.key(*key))
        log.info("tool server %s/%s removed", *key)

    def _pool(self, rec: ToolServerRecord) -> Pool:
        from mesh_tool_executor.pool import Pool, RemoteEndpoint
        from mesh_tool_executor.remote import Auth, Endpoint, EndpointConfig

        kind: type[Endpoint] | type[A2AEndpoint] = Endpoint
        if rec.protocol == "a2a":
            from mesh_tool_executor.remote_a2a import A2AEndpoint

            kind = A2AEndpoint

        spec = rec.definition
        secrets, prefix = self.secrets_dir(rec.tenant)
        secret = prefix + spec.auth.secret if spec.auth.secret else ""
        auth = Auth(kind=spec.auth.kind, secret=secret, token_url=spec.auth.token_url,
                    client_id=spec.auth.client_id, scope=spec.auth.scope)  # fmt: skip
        ca = str(secrets / (prefix + spec.ca)) if spec.ca and secrets is not None else None
        endpoints: list[RemoteEndpoint] = []
        for i, url in enumerate(spec.endpoints):
            config = EndpointConfig(url, auth=auth, secrets_dir=secrets, ca_file=ca,
                                    max_response_bytes=spec.max_response_bytes)  # fmt: skip
            endpoints.append(kind(config, label=f"{rec.tenant}/{rec.server}#{i + 1}"))
        return Pool.of(f"{rec.tenant}/{rec.server}", endpoints)

    def secrets_dir(self, tenant: str) -> tuple[Path | None, str]:
        """Where the tenant's secrets are and the prefix of their file names: its own directory
        (``MESH_TOOL_SECRETS_DIR/<tenant>/<name>``), else files named ``<tenant>.<name>`` (a
        Kubernetes Secret's keys cannot hold a ``/``). A record names files of its own tenant only:
        a name holds no ``/`` and a tenant no ``.``, so one tenant can never name another's."""
        root = self.settings.tool_secrets_dir
        if root is None:
            return None, ""
        return (root / tenant, "") if (root / tenant).is_dir() else (root, f"{tenant}.")

    # --- listing and judging ------------------------------------------------------------------------

    async def refresh(self, m: Mounted) -> None:
        """List the server's tools, judge each against its pin, and publish what changed."""
        from mesh_tool_executor.remote import EndpointError

        assert m.pool is not None
        rec = m.rec
        error = ""
        listing: list[Any] | None = None
        try:
            listing = await m.pool.list_tools()
        except EndpointError as exc:
            error = str(exc)
        state = ToolServerState(tenant=rec.tenant, server=rec.server, version=rec.version, checked_at=time.time(),
                                error=error)  # fmt: skip
        listed = (rec.version, [(t.name, _hash(t)) for t in listing]) if listing is not None else None
        if listing is None or (listed == m.listed and m.state is not None):
            # Unreachable, or listed as last time under the same record: what was judged stands (an
            # unreachable server's approved tools stay offered: a call fails over or fails with the
            # reason; the state says why the listing is stale).
            state.tools = m.state.tools if m.state is not None else []
            state.endpoints = m.pool.health()
            m.state = state
            await self._write(state)
            return
        state.tools = [self._judge(rec, t) for t in listing]
        state.endpoints = m.pool.health()
        m.tools, m.state, m.listed = self._tools(m, listing, state.tools), state, listed
        await self._announce(m, state.tools)
        reg = self.registry(rec.tenant)
        for name in [n for n, t in reg.tools.items() if t.source == f"tenant:{rec.server}" and n not in m.tools]:
            reg.tools.pop(name)
        reg.tools.update(m.tools)
        await self._write(state)
        if not await self._publish_catalogue(rec.tenant):
            m.listed = None  # judged and published again on the next check

    def _judge(self, rec: ToolServerRecord, tool: Any) -> ListedTool:
        description = tool.description or ""
        schema = dict(tool.input_schema or {})
        sha = _hash(tool)
        scored = injection_score(description) if description else None
        listed = ListedTool(name=tool.name, sha256=sha, description=description, input_schema=schema,
                            injection_score=round(scored.score, 3) if scored else 0.0,
                            signals=list(scored.signals) if scored else [])  # fmt: skip
        pin = rec.pins.get(tool.name)
        if pin is None:
            listed.status = "pending"
        elif pin.sha256 == sha:
            listed.status = "approved"
        else:
            listed.status = "suspended"
            listed.changed = [
                what for what, before, now in (
                    ("description", pin.description_sha256, field_hash(description)),
                    ("input_schema", pin.schema_sha256, field_hash(schema)),
                ) if before != now
            ] or ["definition"]  # fmt: skip
        return listed

    def _tools(self, m: Mounted, listing: list[Any], judged: list[ListedTool]) -> dict[str, Tool]:
        """The approved tools, as the tenant's registry holds them."""
        rec, spec = m.rec, m.rec.definition
        status = {t.name: t.status for t in judged}
        tools: dict[str, Tool] = {}
        for t in listing:
            name = f"{rec.server}__{t.name}"
            if status.get(t.name) != "approved" or not re.match(_MOUNTED_NAME, name):
                continue
            raw = dict(t.input_schema or {})
            takes_key = IDEMPOTENCY_ARG in (raw.get("properties") or {})
            offered = _without_key(raw) if takes_key else raw
            try:
                schemas.validator(offered)
            except jsonschema.SchemaError as exc:
                log.warning("tool %s of %s/%s not offered: invalid input schema: %s", name, rec.tenant,
                            rec.server, exc.message)  # fmt: skip
                continue
            rules = spec.tools.get(t.name)
            tools[name] = Tool(
                name,
                t.description or f"{t.name} (tool server {rec.server})",
                None,
                self._runner(m, t.name, takes_key),
                risk=(
                    rules.risk if rules and rules.risk else spec.default_risk
                ),  # the tenant's word, never the server's
                timeout_s=(rules.timeout_s if rules and rules.timeout_s else spec.timeout_s),
                needs_approval=bool(rules and rules.needs_approval),
                on_untrusted=rules.on_untrusted if rules else None,
                rate_per_min=(rules.rate_per_min if rules and rules.rate_per_min else spec.rate_per_min),
                untrusted_output=True,  # another program's answer: content, never instructions
                input_schema=offered,
                source=f"tenant:{rec.server}",
                extra={"idempotent": takes_key},
            )
        return tools

    def _runner(self, m: Mounted, remote: str, takes_key: bool) -> Any:
        async def run(args: Any, ctx: ToolContext) -> str:
            return await self.call(m, remote, dict(args), ctx, takes_key)

        return run

    async def call(self, m: Mounted, remote: str, args: dict[str, Any], ctx: ToolContext, takes_key: bool) -> str:
        """One call, failed over as ``pool.Pool.call`` may; the route goes to ``ctx.observe``."""
        from mesh_tool_executor.mcp_mount import _result_text
        from mesh_tool_executor.pool import PoolError

        assert m.pool is not None
        name = f"{m.rec.server}__{remote}"
        tool = m.tools.get(name)
        if takes_key:
            args[IDEMPOTENCY_ARG] = ctx.key
        idempotent = takes_key or (tool is not None and tool.risk == "read")
        timeout = tool.timeout_s if tool is not None else m.rec.definition.timeout_s
        try:
            result, route = await m.pool.call(remote, args, timeout_s=timeout, idempotent=idempotent,
                                              server=m.rec.server)  # fmt: skip
        except PoolError as exc:
            self._observe(ctx, exc.route)
            self.mesh.count(tool_executor_metrics.M_SERVER_CALLS, {"outcome": exc.kind})
            if exc.kind == "auth":
                raise CredentialsRefused(str(exc), exc.route) from None
            raise ToolError(f"{name} failed: {exc}") from None
        self._observe(ctx, route)
        self.mesh.count(tool_executor_metrics.M_SERVER_CALLS, {"outcome": "ok"})
        if len(route.attempts) > 1:
            self.mesh.count(tool_executor_metrics.M_SERVER_FAILOVERS, {"server": m.rec.server})
        text = _result_text(result)
        if result.is_error:
            raise ToolError(text or f"{name} failed (no details)")
        return text

    @staticmethod
    def _observe(ctx: ToolContext, route: Any) -> None:
        """The route to the call's answer (``tool.completed``) and to its span."""
        if ctx.observe is not None:
            ctx.observe(route)
        span = trace.get_current_span()
        span.set_attribute("mesh.tool.server", route.server)
        span.set_attribute("mesh.tool.endpoint", route.endpoint)
        span.set_attribute("mesh.tool.attempts", len(route.attempts))
        span.set_attribute("mesh.tool.latency_ms", route.latency_ms)
        if route.attempts:
            span.set_attribute("mesh.tool.outcomes", [a.outcome for a in route.attempts])

    async def _announce(self, m: Mounted, judged: list[ListedTool]) -> None:
        """Each newly suspended definition on the tenant's audit chain, once (keyed by its hash)."""
        for t in judged:
            mark = f"{t.name}:{t.sha256}"
            if t.status != "suspended" or mark in m.announced:
                continue
            m.announced.add(mark)
            self.mesh.count(tool_executor_metrics.M_SERVER_SUSPENSIONS, {"server": m.rec.server})
            log.warning("tool %s__%s of tenant %s suspended: its %s changed since it was approved",
                        m.rec.server, t.name, m.rec.tenant, " and ".join(t.changed))  # fmt: skip
            pin = m.rec.pins[t.name]
            await self.audit.append(
                m.rec.tenant, f"tools-{m.rec.server}", "tools.suspended", f"suspended:{m.rec.server}:{mark}",
                actor="tool-executor",
                detail={"server": m.rec.server, "tool": t.name, "changed": t.changed, "approved": pin.sha256,
                        "listed": t.sha256, "approved_by": pin.approved_by, "description": t.description[:2000],
                        "injection_score": t.injection_score},
            )  # fmt: skip

    # --- publishing ---------------------------------------------------------------------------------

    async def _write(self, state: ToolServerState) -> None:
        """The state, when what it says changed (a tool's status or hash, an endpoint's health,
        breaker or error) or every ``STATE_EVERY_S`` (its counts and latencies): a check every 15 s
        must not be a synced write every 15 s per server and replica when nothing happened."""
        if self.kv is None:
            return
        key = (state.tenant, state.server)
        gist = field_hash({"error": state.error, "version": state.version,
                           "tools": [(t.name, t.sha256, t.status) for t in state.tools],
                           "endpoints": [(e.url, e.healthy, e.breaker, e.last_error) for e in state.endpoints]})  # fmt: skip
        last = self._written.get(key)
        if last is not None and last[0] == gist and time.monotonic() - last[1] < STATE_EVERY_S:
            return
        try:
            await self.kv.put(ToolServerState.key(state.tenant, state.server), state.to_bytes())
            self._written[key] = (gist, time.monotonic())
        except Exception as exc:  # noqa: BLE001 - the next check writes it again
            log.warning("state of tool server %s/%s not written: %s", state.tenant, state.server, exc)

    async def _publish_catalogue(self, tenant: str) -> bool:
        """The tenant's catalogue, written when it differs from what is stored (every replica
        computes the same one from the same listing). False when it could not be written."""
        if self.kv is None:
            return True
        tools = sorted(self.registry(tenant).tools.values(), key=lambda t: t.name)
        servers = sorted(s for t, s in self.mounted if t == tenant)
        catalogue = TenantToolCatalogue(tenant=tenant, servers=servers, tools=[t.describe() for t in tools])
        key = TenantToolCatalogue.key_of(tenant)
        body = catalogue.to_bytes()
        try:
            with contextlib.suppress(Exception):
                if (await self.kv.get(key)).value == body:
                    return True
            await self.kv.put(key, body)
        except Exception as exc:  # noqa: BLE001 - the next check writes it again
            log.warning("tool catalogue of %s not written: %s", tenant, exc)
            return False
        return True

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.tool_server_check_s)
            for m in list(self.mounted.values()):
                if m.pool is None:
                    continue
                try:
                    await m.pool.check()
                    await self.refresh(m)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("tool server %s/%s not checked", m.rec.tenant, m.rec.server)


def _hash(tool: Any) -> str:
    """A listed tool's ``definition_hash`` (what an approval pins)."""
    return definition_hash(tool.name, tool.description or "", dict(tool.input_schema or {}))


def _without_key(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema a model is offered: without the idempotency key the executor fills itself."""
    out = dict(schema)
    out["properties"] = {k: v for k, v in (schema.get("properties") or {}).items() if k != IDEMPOTENCY_ARG}
    if "required" in schema:
        out["required"] = [r for r in schema["required"] if r != IDEMPOTENCY_ARG]
    return out
