"""How a call the policy let through runs: under the ledger, the tool's rate limit and timeout.

Every call runs under the idempotency ledger by its deterministic call id, so a redelivered
request gets the recorded outcome instead of running the tool again; an effect's sink (the
outbox) is handed the same key as its own idempotency key, and a write or external call that ran
is a ``tool.performed`` link of the tenant's audit chain. A tool runs with a ``ToolContext``: the
outbox, HTTP fetches under the network policy, the task's steps, the tenant's notes. Tools of MCP
servers are mounted here too, as tools like the built-ins.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import nats.errors

from mesh_contracts.v1 import ControlHalt, ToolRequested
from mesh_durable import records
from mesh_durable.chain import Appender
from mesh_durable.ledger import Ledger
from mesh_guardrails.redact import redact
from mesh_host import Mesh
from mesh_kit import Delivery
from mesh_kit.faults import crash_point
from mesh_tool_executor import metrics as tool_executor_metrics
from mesh_tool_executor import net
from mesh_tool_executor.errors import ToolExecutorError
from mesh_tool_executor.limits import RateLimiter
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_tool_executor.tool_servers import CredentialsRefused
from mesh_tool_executor.tools import MemoryNotes, Notes, Registry, StepLookup, Tool, ToolContext, ToolError, with_policy

if TYPE_CHECKING:
    from mesh_tool_executor.mcp_mount import McpMount  # imported when a mount is configured: the SDK is slow

log = logging.getLogger("mesh.tool-executor")


class EffectUnconfirmed(ToolExecutorError, nats.errors.TimeoutError):
    """An effect was handed to its sink (the outbox) and the sink's receipt did not come back
    (its stream's leader moved, the broker restarted or hung): it may or may not have landed.
    Not an outcome to record. It is the broker's timeout (``mesh_kit.settings.BROKER_UNAVAILABLE``),
    so the handler is re-run in place without spending an attempt; the claim in the ledger is the
    same delivery's to take back, and the sink is handed the same idempotency key: one effect."""

    def __str__(self) -> str:  # not nats' "nats: timeout": say which effect and why
        return str(self.args[0]) if self.args else "effect unconfirmed"


class Runner:
    """Runs calls (``run_recorded``). ``audit``: the tenants' audit chains; ``ledger``, ``tasks``:
    the ledger and KV ``tasks``, as they are once the service started. It keeps what only a
    running tool uses: the tenants' ``notes``, the rate ``limiter`` and the MCP ``mcp`` mount."""

    def __init__(
        self,
        mesh: Mesh,
        settings: ToolExecutorSettings,
        registry: Registry,
        audit: Appender,
        *,
        ledger: Callable[[], Ledger | None],
        tasks: Callable[[], Any],
    ) -> None:
        self.mesh, self.settings, self.registry, self.audit = mesh, settings, registry, audit
        self._ledger, self._tasks = ledger, tasks
        self.notes: Notes = MemoryNotes()
        self.limiter = RateLimiter(
            mesh.settings.redis_url if mesh.settings else "",
            on_local=lambda: mesh.count(tool_executor_metrics.M_RATE_LIMIT_LOCAL),
        )
        self.mcp: McpMount | None = None

    async def close(self) -> None:
        if self.mcp is not None:
            await self.mcp.close()
        await self.limiter.close()

    # --- the context a tool runs in -------------------------------------------------------------

    async def effect(self, suffix: str, payload: bytes, key: str) -> str:
        ack = await self.mesh.nc.jetstream().publish(
            f"outbox.{suffix}", payload, headers={"Nats-Msg-Id": key}, timeout=10.0
        )
        crash_point("after_effect")  # fault injection for the chaos suite: effect done, not yet recorded
        return f"outbox #{ack.seq}"

    async def fetch(self, url: str) -> str:
        try:
            r = await net.fetch(url, allow=self.settings.allow)
        except net.NetError as exc:
            raise ToolError(str(exc)) from None
        more = " [truncated]" if r.truncated else ""
        return f"HTTP {r.status} {r.final_url} ({r.content_type}){more}\n\n{r.text}"

    def step_lookup(self, tenant: str, task_id: str) -> StepLookup:
        async def lookup(step_id: str) -> tuple[str, str, str]:
            rec = await records.task_record(self._tasks(), tenant, task_id)
            if rec is None:
                return "", "", ""
            s = rec.steps.get(step_id)
            return rec.status, (s.status if s else ""), (s.output if s else "")

        return lookup

    # --- running a call -------------------------------------------------------------------------

    async def run(self, m: ToolRequested, tool: Tool, args: Any, key: str, delivery: Delivery | None) -> dict[str, Any]:
        unconfirmed: list[str] = []  # effects handed to the sink whose receipt has not come back

        async def effect(suffix: str, payload: bytes, effect_key: str) -> str:
            unconfirmed.append(effect_key)
            receipt = await self.effect(suffix, payload, effect_key)
            unconfirmed.remove(effect_key)
            return receipt

        routes: list[Any] = []  # where a call to a tenant's tool server went (its replicas tried)
        ctx = ToolContext(
            tenant=m.tenant,
            task_id=m.task_id,
            key=key,
            effect=effect,
            step_state=self.step_lookup(m.tenant, m.task_id) if self._tasks() is not None else None,
            notes=self.notes,
            fetch=self.fetch,
            observe=routes.append,
        )
        try:
            wait = await self.limiter.take(m.tenant, tool.name, tool.rate_per_min)
            if wait > 0:
                error = (f"rate limited: {tool.name} allows {tool.rate_per_min} calls per minute per tenant; "
                         f"try again in {wait:.0f}s")  # fmt: skip
                return {"ok": False, "result": "", "error": error, "untrusted": False}
            async with delivery.keepalive() if delivery is not None else contextlib.nullcontext():
                result = await self.registry.run(tool, args, ctx)
            return _routed({"ok": True, "result": result, "error": "", "untrusted": tool.untrusted_output}, routes)
        except ToolError as exc:
            if unconfirmed:
                # Timed out waiting for the sink's receipt (a broker failover takes seconds): "failed"
                # would be a lie if the effect landed, and final if it did not. Ask again instead.
                raise EffectUnconfirmed(f"{tool.name}: the outbox did not confirm {unconfirmed[0]} ({exc}); "
                                        "retried under the same key") from None  # fmt: skip
            # A tool whose output is outside content fails with outside content too: an HTTP
            # error's status line and headers, an MCP server's error text. Same taint.
            return _routed({"ok": False, "result": "", "error": str(exc), "untrusted": tool.untrusted_output}, routes)

    async def run_recorded(self, m: ToolRequested, tool: Tool, args: Any, d: Delivery | None) -> dict[str, Any]:
        ledger = self._ledger()
        if ledger is None:  # in-memory tests without a KV store
            return await self.run(m, tool, args, f"{m.tenant}.{m.task_id}.{m.call_id}", d)
        key = ledger.key(m.tenant, m.task_id, m.call_id)
        try:
            outcome: dict[str, Any] = await ledger.run(
                key,
                lambda k: self.run(m, tool, args, k, d),
                owner=d.owner if d is not None else f"approval:{m.call_id}",
                attempt=d.deliveries if d is not None else 1,
            )
        except CredentialsRefused as exc:
            return await self.hold(m, key, exc)
        if tool.risk != "read":
            # The effect itself, as a link of the tenant's chain beside the decision that let it
            # run: whether it succeeded, under which idempotency key, and a digest of what it
            # returned (not the result: it can be large, and the task's messages hold it). A
            # redelivery gets the recorded outcome and appends under the same key: stored once.
            await self.audit.append(
                m.tenant, m.task_id, "tool.performed", f"{m.call_id}:performed", actor="tool-executor",
                detail={"step_id": m.step_id, "call_id": m.call_id, "tool": m.tool, "risk": tool.risk,
                        "ok": bool(outcome.get("ok")), "error": redact(str(outcome.get("error", "")))[:300],
                        "result_sha256": hashlib.sha256(str(outcome.get("result", "")).encode()).hexdigest(),
                        "idempotency_key": key},
            )  # fmt: skip
        return outcome

    async def hold(self, m: ToolRequested, key: str, exc: CredentialsRefused) -> dict[str, Any]:
        """The tool's server refused the tenant's credentials, so nothing ran: the claim is taken
        back and the task halted (``control.halt``) with what to fix. ``meshctl resume`` runs the
        step again once the secret is right; failing the step would only make a model retry
        something it cannot fix."""
        ledger = self._ledger()
        if ledger is not None:
            await ledger.abandon(key)
        reason = f"{exc} (fix the secret, then: meshctl resume {m.task_id} --tenant {m.tenant})"
        await self.mesh.publish(ControlHalt(tenant=m.tenant, task_id=m.task_id, reason=reason[:1000]),
                                key=f"credentials:{m.call_id}")  # fmt: skip
        log.warning("task %s/%s halted: %s", m.tenant, m.task_id, exc)
        return _routed({"ok": False, "result": "", "error": f"not run: {exc}", "untrusted": False,
                        "stopped": "halted"}, [exc.route])  # fmt: skip

    # --- tools of MCP servers -------------------------------------------------------------------

    async def mount_mcp(self, path: str) -> None:
        # Imported here: the MCP SDK takes ~1.7 s to import, a cost only a configured mount pays.
        from mesh_tool_executor.mcp_mount import McpMount, McpToolError, load_config

        # "python" in a server's command means this interpreter (the tool-executor's own
        # environment, where a bundled server's package is installed), not whatever is on PATH.
        configs = [replace(c, command=sys.executable) if c.command == "python" else c for c in load_config(path)]
        self.mcp = mount = McpMount(configs)
        await mount.start()
        for name, why in getattr(mount, "errors", {}).items():
            log.error("MCP server %s not mounted: %s", name, why)
        for mt in mount.tools():
            overrides = {**mt.policy, **self.settings.policy.get(mt.name, {})}

            async def run(args: Any, ctx: ToolContext, _name: str = mt.name) -> str:
                tool = self.registry.get(_name)
                try:
                    return await mount.call(_name, dict(args), timeout_s=tool.timeout_s if tool else 30.0)
                except McpToolError as exc:
                    raise ToolError(str(exc)) from None

            base = Tool(
                mt.name,
                mt.description or f"{mt.remote_name} (MCP server {mt.server})",
                None,
                run,
                risk=mt.risk,  # the config's word (per tool, else the server's default_risk), never the server's hints
                timeout_s=30.0,
                untrusted_output=True,  # another program's answer: content, never instructions
                input_schema=mt.input_schema,
                source=f"mcp:{mt.server}",
            )
            self.registry.add(with_policy(base, overrides))
            log.info("mounted MCP tool %s (risk %s)", mt.name, self.registry.get(mt.name).risk)  # type: ignore[union-attr]


def _routed(outcome: dict[str, Any], routes: list[Any]) -> dict[str, Any]:
    """The outcome with the route of its call to a tenant's tool server (recorded with it)."""
    if routes and routes[-1] is not None:
        outcome["route"] = routes[-1].model_dump(mode="json")
    return outcome


def scoped(m: ToolRequested, tool: Tool | None) -> dict[str, Any]:
    """The arguments with the tenant forced to the caller's own: a mounted tool that takes a
    ``tenant`` argument (an admin API, say) must never be pointed at another tenant by a model.
    A different tenant in the arguments is refused rather than silently rewritten."""
    args = dict(m.arguments)
    if tool is None or tool.input_schema is None or "tenant" not in tool.input_schema.get("properties", {}):
        return args
    asked = args.get("tenant", m.tenant)
    if asked != m.tenant:
        raise ToolError(f"{m.tool}: tenant {asked!r} is not this task's tenant; a tool acts for its own tenant only")
    args["tenant"] = m.tenant
    return args
