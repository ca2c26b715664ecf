"""The model gateway: backoff, breakers, fallback chains, tiering, streaming resets, config.

Models here are small fakes following a script of outcomes: this tests the gateway's logic,
not any provider's HTTP (the provider adapters have their own tests).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_llm import (
    AllModelsFailed,
    CircuitOpen,
    ConfigError,
    ContextOverflow,
    Message,
    ModelRequest,
    ModelResponse,
    ProviderError,
    ScriptedModel,
    StreamEvent,
    Timeouts,
)
from mesh_llm.config import build_gateway, from_env, is_pinned, load_config
from mesh_llm.gateway import Attempt, Gateway
from mesh_llm.resilience import BreakerPolicy, CircuitBreaker, RetryPolicy, is_provider_fault

pytestmark = pytest.mark.unit
REQ = ModelRequest((Message("user", "hello"),))
NO_BREAKER = BreakerPolicy(min_calls=10**9)  # isolates retry/fallback logic from breaker trips
PROPS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- fakes ------------------------------------------------------------------------------------


def failure(outcome: tuple[str, float]) -> BaseException | None:
    """The exception a scripted outcome stands for (None = success)."""
    kind, retry_after = outcome
    return {
        "ok": None,
        "retryable": ProviderError("503 unavailable", kind="server_error", status=503),
        "fatal": ProviderError("400 bad request", kind="bad_request", status=400, retryable=False),
        "overflow": ContextOverflow("too long"),
        "rate": ProviderError("429 slow down", kind="rate_limited", status=429, retry_after=retry_after),
        "crash": KeyError("choices"),
    }[kind]


class FakeModel:
    """Follows ``script`` (one outcome per call; success once it runs out)."""

    def __init__(self, name: str, script: Sequence[tuple[str, float]] = (), *, window: int = 1000, **kw) -> None:
        self.provider, self.model, self.context_window = "fake", name, window
        self.script = list(script)
        self.calls = 0
        self.chunks: list[str] = kw.get("chunks", ["Hel", "lo"])
        self.log: list[str] = kw.get("log", [])
        self.hang_s: float = kw.get("hang_s", 0.0)

    def count(self, request: ModelRequest) -> int:
        return 7

    def _next(self) -> BaseException | None:
        self.calls += 1
        return failure(self.script.pop(0)) if self.script else None

    def _response(self) -> ModelResponse:
        return ModelResponse("".join(self.chunks), (), 3, 2, self.provider, self.model)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        error = self._next()
        if self.hang_s:
            await asyncio.sleep(self.hang_s)
        if error is not None:
            raise error
        return self._response()

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        error = self._next()
        for chunk in self.chunks[:1] if error else self.chunks:  # a failing stream breaks mid-way
            yield StreamEvent(text=chunk)
            self.log.append(f"{self.model} yielded {chunk}")
        if error is not None:
            raise error
        yield StreamEvent(response=self._response())


@dataclass
class Hooks:
    """Records before/after; optionally refuses (CircuitOpen) or fails on chosen models."""

    refuse: set[str] = field(default_factory=set)
    explode: set[str] = field(default_factory=set)
    before_calls: list[Attempt] = field(default_factory=list)
    after_calls: list[tuple[Attempt, ModelResponse | None, BaseException | None]] = field(default_factory=list)

    async def before(self, attempt: Attempt) -> None:
        self.before_calls.append(attempt)
        if attempt.model.model in self.refuse:
            raise CircuitOpen("mesh breaker open", provider="fake", model=attempt.model.model)
        if attempt.model.model in self.explode:
            raise RuntimeError("budget exhausted")

    async def after(self, attempt, response, error, elapsed_s) -> None:
        self.after_calls.append((attempt, response, error))


class Sleeps:
    def __init__(self) -> None:
        self.slept: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.slept.append(seconds)


# --- backoff ------------------------------------------------------------------------------------

policies = st.builds(
    RetryPolicy,
    max_attempts=st.integers(1, 6),
    base_s=st.floats(0, 5),
    max_s=st.floats(0, 60),
    max_retry_after_s=st.floats(0, 120),
)


@PROPS
@given(policies, st.integers(1, 200), st.integers(0, 2**32))
def test_backoff_without_retry_after_is_full_jitter_within_the_cap(policy, attempt, seed):
    delay = policy.delay(attempt, None, random.Random(seed))
    assert delay is not None
    assert 0 <= delay <= min(policy.max_s, policy.base_s * 2.0 ** min(attempt - 1, 64))


@PROPS
@given(policies, st.integers(1, 50), st.floats(0, 300), st.integers(0, 2**32))
def test_backoff_honours_retry_after_up_to_the_limit(policy, attempt, retry_after, seed):
    delay = policy.delay(attempt, retry_after, random.Random(seed))
    if retry_after > policy.max_retry_after_s:
        assert delay is None
    else:
        assert delay is not None and delay >= retry_after


def test_error_classification():
    for kind in ("server_error", "overloaded", "rate_limited", "timeout", "stalled", "connection", "malformed"):
        assert is_provider_fault(ProviderError("x", kind=kind))
    for kind in ("bad_request", "auth", "context_overflow", "not_found", "circuit_open"):
        assert not is_provider_fault(ProviderError("x", kind=kind))


# --- the fallback walk, as a property ------------------------------------------------------------

outcomes = st.tuples(st.sampled_from(["ok", "retryable", "fatal", "overflow", "rate", "crash"]), st.floats(0, 60))


@PROPS
@given(
    st.integers(1, 4),
    st.lists(st.lists(outcomes, min_size=4, max_size=4), min_size=1, max_size=4),
    st.integers(0, 2**32),
)
def test_gateway_walks_the_chain_by_the_rules(max_attempts, scripts, seed):
    policy = RetryPolicy(max_attempts=max_attempts, max_retry_after_s=30)
    models = [FakeModel(f"m{i}", s) for i, s in enumerate(scripts)]
    sleeps, hooks = Sleeps(), Hooks()
    gateway = Gateway({"default": models}, retry=policy, breaker=NO_BREAKER, sleep=sleeps, rng=random.Random(seed))

    # What the rules say should happen, worked out independently of the gateway.
    oracle_rng, winner, failures, delays = random.Random(seed), None, [], []
    for i, script in enumerate(scripts):
        for n in range(1, max_attempts + 1):
            kind, retry_after = script[n - 1]
            if kind == "ok":
                winner = i
                break
            failures.append((i, kind))
            if kind in ("fatal", "overflow") or n == max_attempts:
                break
            delay = policy.delay(n, retry_after if kind == "rate" else None, oracle_rng)
            if delay is None:
                break
            delays.append(delay)
        if winner is not None:
            break

    try:
        response = asyncio.run(gateway.complete(REQ, hooks=hooks))
        raised = None
    except AllModelsFailed as exc:
        response, raised = None, exc

    assert (response.model if response else None) == (f"m{winner}" if winner is not None else None)
    assert all(m.calls <= max_attempts for m in models)
    assert len(hooks.before_calls) == len(hooks.after_calls) == sum(m.calls for m in models)
    assert [a.number for a in hooks.before_calls] == list(range(1, len(hooks.before_calls) + 1))
    for before, (after, _, _) in zip(hooks.before_calls, hooks.after_calls, strict=True):
        assert before is after
    seen = [(int(a.model.model[1:]), e) for a, _, e in hooks.after_calls if e is not None]
    assert [(i, _kind_of(e)) for i, e in seen] == failures
    # A caller's fault is never retried on the same model: the next attempt is on another one.
    for (a, _, e), nxt in zip(hooks.after_calls, hooks.after_calls[1:], strict=False):
        if e is not None and not is_provider_fault(e):
            assert nxt[0].position > a.position
    assert sleeps.slept == delays
    assert sum(sleeps.slept) == pytest.approx(sum(delays))
    if raised is not None:
        assert [e for _, e in seen] == raised.attempts
        assert raised.args[0].startswith(f"all {len(models)} models failed: ")


def _kind_of(error: BaseException) -> str:
    assert isinstance(error, ProviderError)
    return {
        "server_error": "retryable",
        "bad_request": "fatal",
        "context_overflow": "overflow",
        "rate_limited": "rate",
        "provider_error": "crash",
    }[error.kind]


# --- breakers, as properties ---------------------------------------------------------------------

ops = st.lists(st.tuples(st.floats(0, 20), st.booleans(), st.booleans()), max_size=60)


@PROPS
@given(
    ops,
    st.builds(
        BreakerPolicy,
        window_s=st.floats(1, 60),
        min_calls=st.integers(1, 8),
        failure_rate=st.floats(0.05, 1),
        cooldown_s=st.floats(0.1, 30),  # 0 would skip "open" straight to half-open
    ),
)
def test_breaker_opens_by_rate_refuses_during_cooldown_and_probes_one_at_a_time(steps, policy):
    now = [0.0]
    breaker = CircuitBreaker("fake/m", policy, clock=lambda: now[0])
    window: list[tuple[float, bool]] = []  # our own account of the rolling window
    opened_at = None
    for dt, ok, double in steps:
        now[0] += dt
        state = breaker.state
        if opened_at is not None and now[0] - opened_at < policy.cooldown_s:
            assert state == "open" and not breaker.allow() and 0 <= breaker.retry_in() <= policy.cooldown_s
            continue
        if not breaker.allow():
            raise AssertionError(f"refused in state {state}")
        if state == "half_open":
            assert not breaker.allow(), "half-open admits one probe at a time"
            breaker.record(ok)
            opened_at, window = (None, []) if ok else (now[0], [])
            assert breaker.state == ("closed" if ok else "open")
            continue
        assert state == "closed"
        if double:
            assert breaker.allow()  # closed: everyone goes
        window = [(t, good) for t, good in window if t > now[0] - policy.window_s] + [(now[0], ok)]
        failures = sum(1 for _, good in window if not good)
        should_open = len(window) >= policy.min_calls and failures >= policy.failure_rate * len(window)
        breaker.record(ok)
        assert breaker.state == ("open" if should_open else "closed")
        if should_open:
            opened_at, window = now[0], []


def test_breaker_release_frees_a_probe_without_a_verdict():
    now = [0.0]
    breaker = CircuitBreaker("fake/m", BreakerPolicy(min_calls=1, cooldown_s=5), clock=lambda: now[0])
    breaker.record(False)
    assert breaker.state == "open" and breaker.retry_in() == 5
    now[0] = 5
    assert breaker.allow() and not breaker.allow()
    breaker.release()
    assert breaker.allow()


# --- gateway examples ---------------------------------------------------------------------------


def test_tiering_picks_the_most_specific_route():
    chains = {k: [FakeModel(k)] for k in ("default", "hard", "planner", "planner:hard", "easy")}
    gateway = Gateway(chains)

    def route(agent: str = "", difficulty: str = "") -> str:
        return gateway.route_for(ModelRequest((), agent=agent, difficulty=difficulty))[0]

    assert route() == "default"
    assert route(difficulty="hard") == "hard"
    assert route(agent="planner") == "planner"
    assert route(agent="planner", difficulty="hard") == "planner:hard"
    assert route(agent="planner", difficulty="easy") == "planner"
    assert route(agent="worker", difficulty="easy") == "easy"
    assert route(agent="worker", difficulty="normal") == "default"


async def test_the_gateway_is_a_chat_model_over_its_default_chain():
    gateway = Gateway({"default": [FakeModel("a", window=800), FakeModel("b", window=500)], "x": [FakeModel("c")]})
    assert (gateway.provider, gateway.model, gateway.context_window) == ("gateway", "default", 500)
    assert gateway.count(REQ) == 7
    events = [e async for e in gateway.stream(REQ)]
    assert [e.text for e in events[:-1]] == ["Hel", "lo"] and events[-1].response.content == "Hello"
    assert set(gateway.snapshot()) == {"fake/a", "fake/b", "fake/c"}
    down = Gateway({"default": [FakeModel("d", [("fatal", 0)])]})
    with pytest.raises(AllModelsFailed, match="400 bad request"):
        [e async for e in down.stream(REQ)]
    with pytest.raises(ConfigError, match="default"):
        Gateway({"hard": [FakeModel("a")]})


async def test_mesh_breaker_in_hooks_skips_the_model_without_calling_it():
    first, second = FakeModel("a"), FakeModel("b")
    hooks = Hooks(refuse={"a"})
    response = await Gateway({"default": [first, second]}).complete(REQ, hooks=hooks)
    assert response.model == "b" and first.calls == 0
    assert [a.model.model for a in hooks.before_calls] == ["a", "b"]
    assert [a.model.model for a, _, _ in hooks.after_calls] == ["b"]


async def test_a_hook_failure_aborts_the_call_unchanged():
    first, second = FakeModel("a"), FakeModel("b")
    with pytest.raises(RuntimeError, match="budget exhausted") as info:
        await Gateway({"default": [first, second]}).complete(REQ, hooks=Hooks(explode={"a"}))
    assert type(info.value) is RuntimeError and first.calls == second.calls == 0


async def test_local_breaker_opens_and_skips_without_hooks():
    now = [0.0]
    bad, good = FakeModel("bad", [("retryable", 0)] * 10), FakeModel("good")
    gateway = Gateway(
        {"default": [bad, good]},
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(min_calls=2, cooldown_s=10),
        sleep=Sleeps(),
        clock=lambda: now[0],
    )
    for _ in range(2):
        await gateway.complete(REQ)
    assert gateway.snapshot()["fake/bad"]["state"] == "open"
    hooks = Hooks()
    assert (await gateway.complete(REQ, hooks=hooks)).model == "good"
    assert bad.calls == 2 and [a.model.model for a in hooks.before_calls] == ["good"]
    gateway.routes["default"] = [bad]
    with pytest.raises(AllModelsFailed, match=r"all 1 models failed: fake/bad: circuit open") as info:
        await gateway.complete(REQ)
    assert isinstance(info.value.attempts[0], CircuitOpen)


async def test_report_names_each_model_and_keeps_the_cause():
    flaky = FakeModel("x", [("retryable", 0)] * 3)
    broken = FakeModel("y", [("crash", 0)] * 3)
    gateway = Gateway({"default": [flaky, broken]}, retry=RetryPolicy(max_attempts=3), sleep=Sleeps())
    with pytest.raises(AllModelsFailed) as info:
        await gateway.complete(REQ)
    message = str(info.value)
    assert message.startswith("all 2 models failed: fake/x: 503 unavailable (3 attempts); fake/y: KeyError")
    assert len(info.value.attempts) == 6 and isinstance(info.value.attempts[-1].__cause__, KeyError)
    assert info.value.attempts[0].model == "x"


async def test_context_overflow_moves_on_without_retrying():
    small, big = FakeModel("small", [("overflow", 0)] * 3), FakeModel("big")
    assert (await Gateway({"default": [small, big]}).complete(REQ)).model == "big"
    assert small.calls == 1


async def test_streaming_forwards_each_delta_as_it_arrives():
    log: list[str] = []

    async def sink(text: str) -> None:
        log.append(f"client got {text}")

    model = FakeModel("a", chunks=["one ", "two ", "three"], log=log)
    await Gateway({"default": [model]}).complete(REQ, on_token=sink)
    assert log == [f"{x} {y}" for t in ("one ", "two ", "three") for x, y in (("client got", t), ("a yielded", t))]


async def test_partial_stream_failure_resets_before_the_fallback_streams():
    log: list[str] = []

    async def sink(text: str) -> None:
        log.append(f"token {text}")

    async def reset(reason: str) -> None:
        log.append(f"reset {reason}")

    broken = FakeModel("a", [("retryable", 0)], chunks=["Par", "tial"])
    fallback = FakeModel("b", chunks=["Hi", " there"])
    gateway = Gateway({"default": [broken, fallback]}, retry=RetryPolicy(max_attempts=1))
    response = await gateway.complete(REQ, on_token=sink, on_reset=reset)
    assert response.content == "Hi there"
    assert log[0] == "token Par" and log[1].startswith("reset fake/a failed mid-stream: 503")
    assert log[2:] == ["token Hi", "token  there"]


async def test_a_failing_token_sink_aborts_unchanged():
    async def sink(text: str) -> None:
        raise ConnectionResetError("client went away")

    second = FakeModel("b")
    with pytest.raises(ConnectionResetError):
        await Gateway({"default": [FakeModel("a"), second]}).complete(REQ, on_token=sink)
    assert second.calls == 0


async def test_each_attempt_is_cut_at_the_total_timeout():
    slow, fast = FakeModel("slow", hang_s=5), FakeModel("fast")
    hooks, sleeps = Hooks(), Sleeps()
    gateway = Gateway(
        {"default": [slow, fast]}, retry=RetryPolicy(max_attempts=2), timeouts=Timeouts(total_s=0.05), sleep=sleeps
    )
    assert (await gateway.complete(REQ, hooks=hooks)).model == "fast"
    errors = [e for _, _, e in hooks.after_calls]
    assert slow.calls == 2 and [getattr(e, "kind", None) for e in errors] == ["timeout", "timeout", None]
    assert len(sleeps.slept) == 1


async def test_retry_after_beyond_the_limit_goes_to_the_fallback_at_once():
    limited, other = FakeModel("a", [("rate", 120)]), FakeModel("b")
    sleeps = Sleeps()
    gateway = Gateway({"default": [limited, other]}, sleep=sleeps)
    assert (await gateway.complete(REQ)).model == "b" and limited.calls == 1 and sleeps.slept == []


# --- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "pinned"),
    [
        ("gpt-4o-mini-2024-07-18", True),
        ("claude-sonnet-4-5-20250929", True),
        ("claude-3-5-sonnet-v2@20241022", True),
        ("claude-3-5-sonnet@20240620", True),
        ("anthropic.claude-3-haiku-20240307-v1:0", True),
        ("gpt-3.5-turbo-0125", True),
        ("gemini-1.5-pro-002", True),
        ("mistral-7b-instruct-v0.2", True),
        ("llama3:v2", True),
        ("llama3@sha256:" + "ab" * 32, True),
        ("llama3:latest@sha256:" + "cd" * 32, True),
        ("Meta-Llama-3-8B-Instruct.Q4_K_M.gguf", True),
        ("scripted-1", True),
        ("gpt-4o", False),
        ("gpt-4", False),
        ("gpt-4-turbo", False),
        ("claude-3-5-sonnet-latest", False),
        ("chatgpt-4o-latest", False),
        ("llama3", False),
        ("llama3:8b", False),
        ("llama-3.1-405b", False),
        ("llama3:latest", False),
        ("qwen2.5:72b-instruct", False),
        ("", False),
    ],
)
def test_is_pinned(model_id, pinned):
    assert is_pinned(model_id) is pinned


EXAMPLE = """
allow_unpinned: false
providers:
  primary: {kind: openai, base_url: "http://127.0.0.1:9001/v1", api_key_env: OPENAI_API_KEY}
  claude:  {kind: anthropic, base_url: "https://api.anthropic.com", api_key_env: ANTHROPIC_API_KEY}
  script:  {kind: scripted}
models:
  fast:   {provider: primary, id: gpt-4o-mini-2024-07-18, context_window: 128000}
  strong: {provider: claude,  id: claude-sonnet-4-5-20250929, context_window: 200000}
  local:  {provider: script,  id: scripted-1}
  alias:  {provider: primary, id: gpt-4o, allow_unpinned: true}
routes:
  default: [fast, local]
  hard: [strong, fast]
  planner: [local]
retry: {max_attempts: 3, base_s: 0.25, max_s: 8, max_retry_after_s: 30}
breaker: {window_s: 30, min_calls: 5, failure_rate: 0.5, cooldown_s: 15}
timeouts: {connect_s: 5, first_token_s: 30, idle_s: 30, total_s: 120}
"""


def scripted_config(**over) -> dict:
    base = {
        "providers": {"script": {"kind": "scripted"}},
        "models": {"local": {"provider": "script", "id": "scripted-1", "context_window": 4096}},
        "routes": {"default": ["local"], "planner": ["local"]},
        "retry": {"max_attempts": 2},
        "breaker": {"min_calls": 3},
    }
    return base | over


def test_example_file_loads(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(EXAMPLE)
    config = load_config(path)
    assert config.routes["hard"] == ["strong", "fast"] and config.models["alias"].allow_unpinned
    json_path = tmp_path / "models.json"
    json_path.write_text(json.dumps(scripted_config()))
    assert load_config(json_path).retry.max_attempts == 2


async def test_build_scripted_gateway():
    gateway = build_gateway(scripted_config())
    assert gateway.retry.max_attempts == 2 and gateway.breakers.policy.min_calls == 3
    assert gateway.context_window == 4096 and gateway.routes["planner"][0] is gateway.routes["default"][0]
    assert (await gateway.complete(ModelRequest((Message("user", "hi"),), agent="worker"))).model == "scripted-1"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"models": {"alias": {"provider": "script", "id": "gpt-4o"}}}, r"model 'alias' id 'gpt-4o' is an unpinned"),
        ({"models": {"m": {"provider": "nowhere", "id": "scripted-1"}}}, r"models\.m\.provider: unknown provider"),
        ({"routes": {"hard": ["local"]}}, r"'default' route is required"),
        ({"routes": {"default": ["ghost"]}}, r"routes\.default\[0\]: unknown model 'ghost'"),
        ({"routes": {"default": []}}, r"routes\.default: a route needs at least one model"),
        ({"providers": {"script": {"kind": "scripted", "api_key": "sk-secret"}}}, r"must not be written"),
        ({"providers": {"script": {"kind": "nope"}}}, r"providers\.script\.kind"),
        ({"providers": {"p": {"kind": "openai"}, "script": {"kind": "scripted"}}}, r"providers\.p: .*base_url"),
        ({"retry": {"max_attempts": 0}}, r"retry\.max_attempts"),
        ({"breaker": {"typo": 1}}, r"breaker\.typo"),
    ],
)
def test_config_validation_names_the_field(change, error):
    with pytest.raises(ConfigError, match=error) as info:
        load_config(scripted_config(**change))
    assert "sk-secret" not in str(info.value)


def test_unpinned_alias_allowed_by_flag():
    alias = {"alias": {"provider": "script", "id": "gpt-4o", "allow_unpinned": True}}
    assert load_config(scripted_config(models=alias | {"local": {"provider": "script", "id": "scripted-1"}}))
    models = {"local": {"provider": "script", "id": "llama3"}}
    assert load_config(scripted_config(models=models, allow_unpinned=True)).allow_unpinned


def test_unset_key_env_is_an_error_only_for_used_providers(tmp_path):
    config = scripted_config(
        providers={"script": {"kind": "scripted"}, "cloud": {"kind": "anthropic", "api_key_env": "MESH_TEST_KEY"}},
        models={
            "local": {"provider": "script", "id": "scripted-1"},
            "strong": {"provider": "cloud", "id": "claude-sonnet-4-5-20250929"},
        },
    )
    assert build_gateway(config, environ={})  # 'strong' is in no route: its key is not needed
    config["routes"] = {"default": ["strong", "local"]}
    with pytest.raises(ConfigError, match=r"providers\.cloud\.api_key_env: environment variable MESH_TEST_KEY"):
        build_gateway(config, environ={"MESH_TEST_KEY": ""})


def test_from_env(tmp_path):
    gateway = from_env({})
    assert [m.model for m in gateway.routes["default"]] == ["scripted-1"]
    with pytest.raises(ConfigError, match="MESH_MODEL_CONFIG"):
        from_env({"MESH_MODEL": "gpt-4o"})
    path = tmp_path / "m.yaml"
    path.write_text(json.dumps(scripted_config()))
    assert from_env({"MESH_MODEL_CONFIG": str(path)}).retry.max_attempts == 2
    with pytest.raises(ConfigError, match="cannot read"):
        from_env({"MESH_MODEL_CONFIG": str(tmp_path / "missing.yaml")})


def test_real_providers_are_built_when_their_modules_exist(tmp_path):
    pytest.importorskip("mesh_llm.openai")
    pytest.importorskip("mesh_llm.anthropic")
    (tmp_path / "key").write_text("sk-file\n")
    path = tmp_path / "models.yaml"
    path.write_text(EXAMPLE.replace("api_key_env: ANTHROPIC_API_KEY", "api_key_file: key"))
    gateway = build_gateway(load_config(path), environ={"OPENAI_API_KEY": "sk-env"})
    assert [m.provider for m in gateway.routes["hard"]][1] == gateway.routes["default"][0].provider
    assert gateway.routes["hard"][0].context_window == 200_000
    assert isinstance(gateway.routes["planner"][0], ScriptedModel)
    # The key file is found relative to the config file; the env key is read from environ.
    assert getattr(gateway.routes["hard"][0], "_api_key", "sk-file") == "sk-file"
    assert getattr(gateway.routes["default"][0], "_api_key", "sk-env") == "sk-env"


async def test_a_scripted_provider_can_take_a_remote_models_time():
    config = scripted_config(providers={"script": {"kind": "scripted", "latency_ms": 120}})
    gateway = build_gateway(config)
    request = ModelRequest((Message("user", "hi"),), agent="worker")
    t0 = time.perf_counter()
    slow = await gateway.complete(request)
    waited = time.perf_counter() - t0
    fast = await build_gateway(scripted_config()).complete(request)
    assert waited >= 0.12, "every call waits its latency"
    assert (slow.content, slow.input_tokens) == (fast.content, fast.input_tokens), "and answers the same"
    bad = {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "latency_ms": 5}
    with pytest.raises(ValueError, match="latency_ms applies to scripted providers only"):
        load_config(scripted_config(providers={"script": {"kind": "scripted"}, "p": bad}))
