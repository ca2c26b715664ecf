"""Spend and reservations: the usage stream and JetStream KV hold the truth, Redis the fast,
atomic view.

- Settled spend per task and per tenant-day is the ``usage.recorded`` stream, each call id
  counted once. The ``budget`` KV bucket holds checkpoints of it (``mesh_budget.accounts``):
  totals complete to a stream sequence, written every second; ``meshctl budget`` reads them.
- Every reservation decision runs as one Redis script over the task's and the tenant-day's
  spent totals and outstanding reservations, so any number of budget replicas grant from
  the same numbers and never together grant more than a ceiling allows.
- The Redis view is rebuilt whenever a key is missing (a new day, a task from before this
  Redis's view began, a flushed or replaced Redis): the script answers "cold", the service reads
  the checkpoint and the stream after it, initialises the view only if it is still missing,
  and asks again.
- A reservation expires only when every usage message stored before its expiry has been
  accounted (the *horizon*; see ``mesh_budget.horizon``). Expiry on the wall clock alone would
  let a lagging accountant forget a call that was made and not yet counted.
- Redis is not the only copy of a reservation: each grant is also written to the
  ``reservations`` bucket (``Held``) before the caller hears of it. It is never deleted (the
  bucket's age limit removes it a day later): a view rebuilt after Redis lost its data reads
  the holds granted since ``horizon - ttl`` (older ones have expired) and leaves out those
  whose call is already counted (its usage is in the stream). For every call, at every moment, its
  cost is held or counted, never neither, so a rebuilt view still counts every call in flight.
  (A delete per call was a stored write per model call: 7 per sample task.)
- The provider breakers live in the same view: settling a call adds its outcome to its
  provider/model's window (two sorted sets, by the call's stored time, once per call), and the
  settle that finds the window failing opens the circuit (a key holding until when); the
  reserve script refuses calls to an open provider/model. The usage durable hands each call to
  one replica, so every replica decides on every call without reading every usage message
  (they did: the work a second replica was meant to share). The rule is the gateway's
  (``mesh_resilience.FailureWindow``), in Lua; a Redis that loses its data forgets the last
  window (at most ``window_s`` of outcomes) and an open circuit.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mesh_budget.errors import BudgetError
from mesh_contracts.v1 import TokenUsage
from mesh_durable.tail import MAX_BATCH, Reader
from mesh_identity import CLOCK_LEEWAY_S
from mesh_resilience import BreakerPolicy

OTHER_LABELS = "(other)"
TASK_TTL_S = 8 * 24 * 3600  # beyond the streams' 7-day retention
DAY_TTL_S = 3 * 24 * 3600
EPOCH_KEY = "budget:epoch"
"""When the budget first found this Redis without a view (a new Redis, or one that lost its data):
a task created after it (plus the clock leeway) has never had a view anywhere but here."""
FRESH_WINDOW_S = 3600.0
"""A task whose first reservation comes within this long of its creation may start from an empty
view (see ``View.reserve``); later ones are rebuilt from KV as before."""

# A hold is ``tokens:cost:expires_at[:step]`` (the step that asked; an older hold names none).
_PRUNE = """
local function held(key, horizon, skip, step)
  local tokens, cost, mine, step_t, step_c = 0, 0, nil, 0, 0
  local all = redis.call('HGETALL', key)
  for i = 1, #all, 2 do
    local t, c, exp, s = string.match(all[i + 1], '^([^:]+):([^:]+):([^:]+):?(.*)$')
    if tonumber(exp) < horizon then
      redis.call('HDEL', key, all[i])
    elseif all[i] == skip then
      mine = {tonumber(t), tonumber(c)}
    else
      tokens = tokens + tonumber(t)
      cost = cost + tonumber(c)
      if step ~= '' and s == step then
        step_t = step_t + tonumber(t)
        step_c = step_c + tonumber(c)
      end
    end
  end
  return tokens, cost, mine, step_t, step_c
end
"""

RESERVE_LUA = (
    _PRUNE
    + f"local EPOCH, TASK_TTL = '{EPOCH_KEY}', {TASK_TTL_S}\n"
    + """
local task_res, task_spent, day_res, day_spent = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local now, horizon, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if KEYS[5] then
  -- The call's provider/model: refused while its circuit is open (until:failed:calls).
  local open = redis.call('GET', KEYS[5])
  if open and tonumber(string.match(open, '^([^:]+)')) > now then
    return {0, 'provider_breaker', open, '0', '0', '0'}
  end
end
local id, day_field = ARGV[4], ARGV[5]
local want_t, want_c = tonumber(ARGV[6]), tonumber(ARGV[7])
local lim_t, lim_c, dlim_t, dlim_c = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local cold_task, cold_day = redis.call('EXISTS', task_spent) == 0, redis.call('EXISTS', day_spent) == 0
local created, leeway, fresh_window = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
if cold_task and created > 0 then
  -- A task created after this view began (the epoch, set when the budget first found this Redis
  -- empty), and recently (no view of it can have expired), has never had a view here and has
  -- nothing durable to rebuild from that a view here would not already hold: it starts at zero.
  local epoch = tonumber(redis.call('GET', EPOCH) or '0')
  if epoch == 0 then
    redis.call('SET', EPOCH, string.format('%.3f', now))
  elseif created > epoch + leeway and now - created < fresh_window then
    redis.call('HSET', task_spent, 'tokens', 0, 'cost', 0)
    redis.call('EXPIRE', task_spent, TASK_TTL)
    cold_task = false
  end
end
if cold_task or cold_day then
  return {-1, (cold_task and 'task' or '') .. (cold_day and 'day' or '')}
end
local spent_t = tonumber(redis.call('HGET', task_spent, 'tokens') or '0')
local spent_c = tonumber(redis.call('HGET', task_spent, 'cost') or '0')
local dspent_t = tonumber(redis.call('HGET', day_spent, 'tokens') or '0')
local dspent_c = tonumber(redis.call('HGET', day_spent, 'cost') or '0')
local step, slim_t, slim_c = ARGV[15], tonumber(ARGV[16]), tonumber(ARGV[17])
local held_t, held_c, mine, sheld_t, sheld_c = held(task_res, horizon, id, step)
local dheld_t, dheld_c, dmine = held(day_res, horizon, day_field, '')
local function answer(ok, code, t, c)
  return {ok, code, tostring(lim_t - spent_t - held_t - t), tostring(lim_c - spent_c - held_c - c),
          tostring(dlim_t - dspent_t - dheld_t - t), tostring(dlim_c - dspent_c - dheld_c - c)}
end
if mine then return answer(1, 'held', mine[1], mine[2]) end
local eps = 1e-9
if spent_t + held_t + want_t > lim_t then return answer(0, 'task_tokens', 0, 0) end
if spent_c + held_c + want_c > lim_c + eps then return answer(0, 'task_cost', 0, 0) end
if dlim_t >= 0 and dspent_t + dheld_t + want_t > dlim_t then return answer(0, 'tenant_daily_tokens', 0, 0) end
if dlim_c >= 0 and dspent_c + dheld_c + want_c > dlim_c + eps then return answer(0, 'tenant_daily_cost', 0, 0) end
if step ~= '' and (slim_t >= 0 or slim_c >= 0) then
  -- The step's share of the task's ceilings (a workflow node's budget_share): its settled calls
  -- (fields st:<step> / sc:<step> of the task's spent) and its holds. Answers its own remainder.
  local sspent_t = tonumber(redis.call('HGET', task_spent, 'st:' .. step) or '0')
  local sspent_c = tonumber(redis.call('HGET', task_spent, 'sc:' .. step) or '0')
  local function step_answer(code)
    return {0, code, tostring(slim_t - sspent_t - sheld_t), tostring(slim_c - sspent_c - sheld_c), '0', '0'}
  end
  if slim_t >= 0 and sspent_t + sheld_t + want_t > slim_t then return step_answer('step_tokens') end
  if slim_c >= 0 and sspent_c + sheld_c + want_c > slim_c + eps then return step_answer('step_cost') end
end
local entry = want_t .. ':' .. string.format('%.10f', want_c) .. ':' .. string.format('%.3f', now + ttl) .. ':' .. step
redis.call('HSET', task_res, id, entry)
redis.call('HSET', day_res, day_field, entry)
redis.call('EXPIRE', task_res, math.ceil(ttl) + 3600)
redis.call('EXPIRE', day_res, math.ceil(ttl) + 3600)
return answer(1, 'granted', want_t, want_c)
"""
)

# Initialise a missing view from the durable totals and the durable reservations (never
# overwrites a live view). ARGV[7] / ARGV[8]: JSON {field: entry} of the task's / the
# tenant-day's outstanding reservations; ARGV[9]: JSON {field: number} of its spend per step
# (st:<step> tokens, sc:<step> cost); ARGV[10..]: the call ids already counted.
INIT_LUA = """
local task_spent, task_counted, day_spent, task_res, day_res = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local function hold(key, entries, ttl)
  for field, entry in pairs(cjson.decode(entries)) do redis.call('HSETNX', key, field, entry) end
  if redis.call('EXISTS', key) == 1 then redis.call('EXPIRE', key, ttl) end
end
if redis.call('EXISTS', task_spent) == 0 then
  redis.call('HSET', task_spent, 'tokens', ARGV[1], 'cost', ARGV[2])
  for field, n in pairs(cjson.decode(ARGV[9])) do redis.call('HSET', task_spent, field, n) end
  redis.call('DEL', task_counted)
  for i = 10, #ARGV do redis.call('SADD', task_counted, ARGV[i]) end
  redis.call('EXPIRE', task_spent, tonumber(ARGV[5]))
  redis.call('EXPIRE', task_counted, tonumber(ARGV[5]))
  hold(task_res, ARGV[7], tonumber(ARGV[5]))
end
if redis.call('EXISTS', day_spent) == 0 then
  redis.call('HSET', day_spent, 'tokens', ARGV[3], 'cost', ARGV[4])
  redis.call('EXPIRE', day_spent, tonumber(ARGV[6]))
  hold(day_res, ARGV[8], tonumber(ARGV[6]))
end
return 1
"""

# Usage arrived: release the reservation and add the call to the view (and to its step's, ARGV[6]),
# once per call id; and (KEYS[6..8], ARGV[7..13]) add its outcome to its provider/model's breaker
# window, once per call.
# Returns {counted, trip, failed, calls, open_until}: trip 1 the circuit opened on this call, 2 it
# is failing and this call failed too (reported to the call's task), 0 neither.
SETTLE_LUA = """
local task_res, task_spent, task_counted, day_res, day_spent = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
redis.call('HDEL', task_res, ARGV[1])
redis.call('HDEL', day_res, ARGV[2])
local counted = 0
if redis.call('EXISTS', task_spent) == 1 and redis.call('SADD', task_counted, ARGV[3]) == 1 then
  redis.call('HINCRBY', task_spent, 'tokens', ARGV[4])
  redis.call('HINCRBYFLOAT', task_spent, 'cost', ARGV[5])
  if ARGV[6] ~= '' then
    redis.call('HINCRBY', task_spent, 'st:' .. ARGV[6], ARGV[4])
    redis.call('HINCRBYFLOAT', task_spent, 'sc:' .. ARGV[6], ARGV[5])
  end
  if redis.call('EXISTS', day_spent) == 1 then
    redis.call('HINCRBY', day_spent, 'tokens', ARGV[4])
    redis.call('HINCRBYFLOAT', day_spent, 'cost', ARGV[5])
  end
  counted = 1
end
local trip, failed, calls, open_until = 0, 0, 0, 0
if KEYS[8] then
  local calls_k, fails_k, open_k = KEYS[6], KEYS[7], KEYS[8]
  local at, ok, member = tonumber(ARGV[7]), ARGV[8] == '1', ARGV[9]
  local window, min_calls = tonumber(ARGV[10]), tonumber(ARGV[11])
  local rate, cooldown = tonumber(ARGV[12]), tonumber(ARGV[13])
  if redis.call('ZADD', calls_k, 'NX', at, member) == 1 then
    if not ok then redis.call('ZADD', fails_k, 'NX', at, member) end
    -- The window ends at the newest outcome (calls may be settled slightly out of order).
    local now = tonumber(redis.call('ZRANGE', calls_k, -1, -1, 'WITHSCORES')[2])
    redis.call('ZREMRANGEBYSCORE', calls_k, '-inf', now - window)
    redis.call('ZREMRANGEBYSCORE', fails_k, '-inf', now - window)
    calls, failed = redis.call('ZCARD', calls_k), redis.call('ZCARD', fails_k)
    local keep = math.ceil(window + cooldown) + 60
    redis.call('EXPIRE', calls_k, keep)
    if failed > 0 then redis.call('EXPIRE', fails_k, keep) end
    if calls >= min_calls and failed >= rate * calls then
      local open = redis.call('GET', open_k)
      local prev = open and tonumber(string.match(open, '^([^:]+)')) or 0
      if at >= prev then
        open_until = at + cooldown
        redis.call('SET', open_k, string.format('%.3f', open_until) .. ':' .. failed .. ':' .. calls, 'EX', keep)
        trip = 1
      elseif not ok then
        open_until = prev
        trip = 2
      end
    end
  end
end
return {counted, trip, failed, calls, string.format('%.3f', open_until)}
"""


class TaskUsage(BaseModel):
    """``budget`` bucket, key ``usage.<tenant>.<task>``: spend per agent and per step,
    deduplicated by call id."""

    tenant: str
    task_id: str
    total: TokenUsage = TokenUsage()
    by_agent: dict[str, TokenUsage] = {}
    """Key ``<service>/<role>`` (e.g. ``worker/worker``, ``checker/judge``)."""
    by_step: dict[str, TokenUsage] = {}
    by_model: dict[str, TokenUsage] = {}
    """Key ``<provider>/<model>``."""
    errors: int = 0
    """Failed model calls (accounted with what the provider billed)."""
    call_ids: list[str] = []
    reservation_ids: list[str] = []
    """Reservations settled here under another id than their call's (a retry's or a fallback's
    attempt, or a failed attempt): with ``call_ids``, the holds a rebuilt view leaves out."""
    updated_at: float = 0.0
    labels: dict[str, str] = {}
    """The task's labels (``task.submitted``): who to charge (team, user...)."""
    call_seqs: dict[str, int] = {}
    """Each counted call's id -> the usage stream sequence of the message that brought it (a later
    copy of the same call, under another message id, is known by its other sequence)."""
    through: int = 0
    """Every usage message up to this stream sequence is counted here (``mesh_budget.accounts``)."""

    def settled(self) -> set[str]:
        """Every reservation id whose call is counted here (a call's first attempt reserves
        under the call's own id)."""
        return {*self.call_ids, *self.reservation_ids}

    @staticmethod
    def key(tenant: str, task_id: str) -> str:
        return f"usage.{tenant}.{task_id}"


class DayUsage(BaseModel):
    """``budget`` bucket, key ``tenant.<tenant>.<yyyymmdd>`` (UTC day)."""

    tenant: str
    day: str
    total: TokenUsage = TokenUsage()
    by_agent: dict[str, TokenUsage] = {}
    by_model: dict[str, TokenUsage] = {}
    tasks: int = 0
    """Tasks that spent anything this day."""
    by_label: dict[str, TokenUsage] = {}
    """Key ``<label>=<value>`` for every label of the task that spent it: cost by team, by user."""
    through: int = 0
    """Every usage message up to this stream sequence is counted here (``mesh_budget.accounts``)."""

    @staticmethod
    def key(tenant: str, day: str) -> str:
        return f"tenant.{tenant}.{day}"


def today(at: float | None = None) -> str:
    return time.strftime("%Y%m%d", time.gmtime(at if at is not None else time.time()))


class Held(BaseModel):
    """``reservations`` bucket, key ``<tenant>.<task>.<call>``: one outstanding reservation."""

    tenant: str
    task_id: str
    call_id: str
    day: str
    tokens: int
    cost_usd: float
    expires_at: float
    """Released after this, once every usage message stored before it has been accounted."""
    step_id: str = ""
    """The step that asked (its partition's monitor learns from the hold that the step started)."""

    def entry(self) -> str:
        """The Redis hash value, as the reserve script writes it."""
        return f"{self.tokens}:{self.cost_usd:.10f}:{self.expires_at:.3f}:{self.step_id}"


class Durable:
    """The ``reservations`` bucket: the copy of every outstanding reservation that outlives Redis."""

    BUCKET = "reservations"

    def __init__(self, kv: Any) -> None:
        self.kv = kv

    async def hold(self, held: Held) -> None:
        await self.kv.put(f"{held.tenant}.{held.task_id}.{held.call_id}", held.model_dump_json().encode())

    async def granted_since(self, nc: Any, since: float, tenant: str, task_id: str = "*") -> list[Held]:
        """The reservations of one task (or, with ``*``, of the tenant) granted at or after
        ``since``, settled or not (the caller leaves out the settled ones): batched direct gets
        from that time on, the newest entry of each key. The bucket keeps a day of them, but a
        rebuild reads only the last ``ttl`` or so (see ``mesh_budget.reserve.rebuild``)."""
        reader = Reader(nc, f"KV_{self.BUCKET}", batch=MAX_BATCH)
        subject = f"$KV.{self.BUCKET}.{tenant}.{task_id}.*"
        found: dict[str, Held | None] = {}
        seq: int | None = None  # from ``since`` first, then on from the last one read
        try:
            while True:
                batch = await reader.read(seq=seq, start_time=max(since, 0.0), subject=subject)
                for m in batch.messages:
                    found[m.subject] = None if m.operation or not m.data else Held.model_validate_json(m.data)
                if batch.messages:
                    seq = batch.messages[-1].seq + 1
                if batch.complete and (not batch.pending or not batch.messages):
                    break
        finally:
            await reader.close()
        return [h for h in found.values() if h is not None]


@dataclass(frozen=True)
class Settled:
    """What settling one call did: whether it was counted now (its first time), and whether its
    provider/model's circuit opened on it (``trip`` 1) or is failing with this call failed too
    (2), with the window's ``failed`` of ``calls`` and until when the circuit is open."""

    counted: bool
    trip: int = 0
    failed: int = 0
    calls: int = 0
    open_until: float = 0.0


@dataclass(frozen=True)
class Decision:
    granted: bool
    code: str
    remaining_tokens: int
    remaining_cost_usd: float
    day_remaining_tokens: int
    day_remaining_cost_usd: float
    open: tuple[float, int, int] | None = None
    """``provider_breaker``: until when the circuit is open, and the failed of all calls that opened it."""


@dataclass(frozen=True)
class Outcome:
    """One call's outcome for its provider/model's breaker, at the call's stored time."""

    provider: str
    model: str
    ok: bool
    at: float


class Cold(BudgetError):
    """The Redis view of a task or tenant-day is missing: initialise it from KV first."""

    def __init__(self, which: str) -> None:
        super().__init__(which)
        self.task = "task" in which
        self.day = "day" in which


class View:
    """The Redis side: one client, three scripts."""

    def __init__(self, redis_url: str, ttl_s: float = 120.0, provider_policy: BreakerPolicy | None = None) -> None:
        from mesh_durable.redis import redis_client

        self.ttl_s = ttl_s
        self.provider_policy = provider_policy or BreakerPolicy()
        self.redis = redis_client(redis_url)
        self._reserve = self.redis.register_script(RESERVE_LUA)
        self._init = self.redis.register_script(INIT_LUA)
        self._settle = self.redis.register_script(SETTLE_LUA)

    @staticmethod
    def task_keys(tenant: str, task_id: str) -> tuple[str, str, str]:
        base = f"budget:task:{tenant}:{task_id}"
        return f"{base}:res", f"{base}:spent", f"{base}:counted"

    @staticmethod
    def day_keys(tenant: str, day: str) -> tuple[str, str]:
        base = f"budget:day:{tenant}:{day}"
        return f"{base}:res", f"{base}:spent"

    @staticmethod
    def provider_keys(provider: str, model: str) -> tuple[str, str, str]:
        """The breaker window's calls and failures (sorted sets by stored time), and its open mark."""
        base = f"budget:provider:{provider}/{model}"
        return f"{base}:calls", f"{base}:failed", f"{base}:open"

    async def reserve(
        self,
        tenant: str,
        task_id: str,
        day: str,
        call_id: str,
        tokens: int,
        cost_usd: float,
        limits: tuple[int, float, int, float],
        horizon: float,
        created_at: float = 0.0,
        provider: tuple[str, str] | None = None,
        step: tuple[str, int, float] = ("", -1, -1.0),
    ) -> Decision:
        """``limits``: task tokens, task cost, tenant-day tokens, tenant-day cost (-1 = none).

        ``created_at`` (the task record's): a task created after this Redis's view began
        (``EPOCH_KEY``, more than the clock leeway after it) and less than ``FRESH_WINDOW_S`` ago
        starts from an empty view in the script itself; its first reservation then costs one
        script call, not a rebuild from KV (two reads, a scan of the holds, two more script
        calls). Anything else cold raises ``Cold`` and is rebuilt as before: a Redis that lost
        its data loses the epoch too, and every task created before the new one is rebuilt.

        ``provider`` (provider, model): refused with ``provider_breaker`` while its circuit is open.

        ``step`` (step id, tokens, cost; -1 = none): the step's own ceilings, a share of the task's
        (``step_tokens`` / ``step_cost``, the remainders then the step's). Its spend is kept beside
        the task's (settled calls by their step, holds by the step that asked)."""
        res, spent, _ = self.task_keys(tenant, task_id)
        dres, dspent = self.day_keys(tenant, day)
        keys = [res, spent, dres, dspent]
        if provider is not None:
            keys.append(self.provider_keys(*provider)[2])
        out = await self._reserve(
            keys=keys,
            args=[time.time(), horizon, self.ttl_s, call_id, f"{task_id}/{call_id}", tokens, f"{cost_usd:.10f}",
                  limits[0], f"{limits[1]:.10f}", limits[2], f"{limits[3]:.10f}", f"{created_at:.3f}",
                  CLOCK_LEEWAY_S, FRESH_WINDOW_S, step[0], step[1], f"{step[2]:.10f}"],
        )  # fmt: skip
        code = out[1].decode() if isinstance(out[1], bytes) else str(out[1])
        if int(out[0]) == -1:
            raise Cold(code)
        if code == "provider_breaker":
            until, failed, calls = (out[2].decode() if isinstance(out[2], bytes) else str(out[2])).split(":")
            return Decision(False, code, 0, 0.0, 0, 0.0, open=(float(until), int(failed), int(calls)))
        return Decision(
            int(out[0]) == 1,
            code,
            int(float(out[2])),
            round(float(out[3]), 10),
            int(float(out[4])),
            round(float(out[5]), 10),
        )

    async def init(
        self, task: TaskUsage | None, day: DayUsage, tenant: str, task_id: str, task_held: list[Held],
        day_held: list[Held],
    ) -> None:  # fmt: skip
        """Rebuild the missing parts of the view: spent from the durable totals, outstanding from
        the durable reservations (a call already counted in ``task`` is not held twice)."""
        res, spent, counted = self.task_keys(tenant, task_id)
        dres, dspent = self.day_keys(tenant, day.day)
        t = task.total if task else TokenUsage()
        by_step: dict[str, float] = {}
        for sid, u in (task.by_step if task else {}).items():
            if sid == "-":
                continue  # calls of no step (accounts' key for them)
            by_step[f"st:{sid}"], by_step[f"sc:{sid}"] = u.total_tokens, round(u.cost_usd, 10)
        done = task.settled() if task else set()
        held_t = {h.call_id: h.entry() for h in task_held if h.call_id not in done}
        held_d = {f"{h.task_id}/{h.call_id}": h.entry() for h in day_held if h.day == day.day}
        await self._init(
            keys=[spent, counted, dspent, res, dres],
            args=[t.total_tokens, f"{t.cost_usd:.10f}", day.total.total_tokens, f"{day.total.cost_usd:.10f}",
                  TASK_TTL_S, DAY_TTL_S, json.dumps(held_t),
                  json.dumps(held_d), json.dumps(by_step), *(task.call_ids if task else [])],
        )  # fmt: skip

    async def settle(self, tenant: str, task_id: str, day: str, reservation_id: str, call_id: str,
                     tokens: int, cost_usd: float, outcome: Outcome | None = None, step_id: str = "") -> Settled:  # fmt: skip
        """Release the call's hold and count it (once per call id); with ``outcome``, add it to
        its provider/model's breaker window (once per call)."""
        res, spent, counted = self.task_keys(tenant, task_id)
        dres, dspent = self.day_keys(tenant, day)
        keys = [res, spent, counted, dres, dspent]
        args: list[Any] = [reservation_id, f"{task_id}/{reservation_id}", call_id, tokens, f"{cost_usd:.10f}", step_id]
        if outcome is not None:
            p = self.provider_policy
            keys += self.provider_keys(outcome.provider, outcome.model)
            args += [repr(outcome.at), "1" if outcome.ok else "0", f"{tenant}/{task_id}/{call_id}", p.window_s,
                     p.min_calls, repr(p.failure_rate), p.cooldown_s]  # fmt: skip
        out = await self._settle(keys=keys, args=args)
        until = out[4].decode() if isinstance(out[4], bytes) else str(out[4])
        return Settled(bool(int(out[0])), int(out[1]), int(out[2]), int(out[3]), float(until))

    async def close(self) -> None:
        await self.redis.aclose()
