"""Gateway configuration: providers, pinned models, routes and resilience policies.

Loaded from YAML/JSON (or a dict), validated with pydantic, and turned into a ``Gateway``.
Every problem surfaces as a ``ConfigError`` naming the offending field. API keys are never
written in the file: a provider names an environment variable or a file holding the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from mesh_llm.errors import ConfigError
from mesh_llm.gateway import Gateway
from mesh_llm.model import ChatModel, Timeouts
from mesh_llm.resilience import BreakerPolicy, RetryPolicy
from mesh_llm.scripted import ScriptedModel

if TYPE_CHECKING:
    import httpx

_DIGEST = re.compile(r"@sha256:[0-9a-f]{32,}$|@[0-9a-f]{40}$")  # content digest or commit revision
_DATE = re.compile(r"(?:^|[-@_:./])(?:20\d{2}-[01]\d-[0-3]\d|20\d{2}[01]\d[0-3]\d)(?=$|[-@_:./])")
_REVISION = re.compile(r"[-@_:](?:\d{3,4}|v\d+(?:\.\d+)*)(?=$|[-@_:./])")
_LATEST = re.compile(r"(?:^|[-@_:./])latest$")


def is_pinned(model_id: str) -> bool:
    """Whether ``model_id`` names one fixed model version (so answers cannot drift under us).

    Pinned: a content digest (``@sha256:<hex>``, or ``@<40-hex commit>``); a quantised file
    (``*.gguf``); the scripted model (``scripted-*``); a date (``-2024-07-18``, ``-20250929``,
    ``@20240620``); a numbered revision segment (``-0125``, ``-001``, ``-v1``, ``:v2``).
    Unpinned: anything ending in ``latest`` (unless digest-pinned) and every id without one
    of those markers, i.e. bare family names and moving aliases (``gpt-4o``, ``llama3``).
    """
    mid = model_id.strip().lower()
    if not mid:
        return False
    if _DIGEST.search(mid):
        return True
    if _LATEST.search(mid):
        return False
    if mid.endswith(".gguf") or mid.startswith("scripted-"):
        return True
    return bool(_DATE.search(mid) or _REVISION.search(mid))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProviderConfig(_Strict):
    """One endpoint. ``kind`` picks the adapter; the key comes from ``api_key_env`` or ``api_key_file``."""

    kind: Literal["openai", "anthropic", "scripted"]
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    extra_headers: dict[str, str] | None = None
    extra_query: dict[str, str] | None = None
    latency_ms: float = Field(default=0.0, ge=0, le=600_000)
    """A scripted provider's wait before each answer (what a remote model costs in time, without
    one: for scale-out benchmarks). Scripted providers only."""

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and "api_key" in data:
            raise ValueError("api_key must not be written in the config: use api_key_env or api_key_file")
        return data

    @model_validator(mode="after")
    def _coherent(self) -> ProviderConfig:
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both")
        if self.kind == "openai" and not self.base_url:
            raise ValueError("an openai provider needs base_url")
        if self.kind != "scripted" and self.latency_ms:
            raise ValueError("latency_ms applies to scripted providers only")
        if self.kind != "openai" and (self.extra_headers or self.extra_query):
            raise ValueError("extra_headers/extra_query apply to openai providers only")
        return self


class ModelConfig(_Strict):
    """A model id at a provider; ``id`` must be pinned unless ``allow_unpinned``."""

    provider: str
    id: str = Field(min_length=1)
    context_window: int | None = Field(default=None, gt=0)
    allow_unpinned: bool = False


class RetryConfig(_Strict):
    """``RetryPolicy`` as the config file says it; the defaults are the policy's own."""

    max_attempts: int = Field(default=RetryPolicy.max_attempts, ge=1, le=20)
    base_s: float = Field(default=RetryPolicy.base_s, ge=0)
    max_s: float = Field(default=RetryPolicy.max_s, ge=0)
    max_retry_after_s: float = Field(default=RetryPolicy.max_retry_after_s, ge=0)


class BreakerConfig(_Strict):
    """``BreakerPolicy`` (``mesh_resilience``) as the config file says it; the defaults are the policy's own."""

    window_s: float = Field(default=BreakerPolicy.window_s, gt=0)
    min_calls: int = Field(default=BreakerPolicy.min_calls, ge=1)
    failure_rate: float = Field(default=BreakerPolicy.failure_rate, gt=0, le=1)
    cooldown_s: float = Field(default=BreakerPolicy.cooldown_s, ge=0)


class TimeoutsConfig(_Strict):
    """``Timeouts`` as the config file says them; the defaults are its own."""

    connect_s: float = Field(default=Timeouts.connect_s, gt=0)
    first_token_s: float = Field(default=Timeouts.first_token_s, gt=0)
    idle_s: float = Field(default=Timeouts.idle_s, gt=0)
    total_s: float = Field(default=Timeouts.total_s, gt=0)


class GatewayConfig(_Strict):
    """The whole file. Cross-references and pinning are checked here; keys at build time."""

    allow_unpinned: bool = False
    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]
    routes: dict[str, list[str]]
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    _source_dir: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        if "default" not in self.routes:
            raise ValueError("routes: a 'default' route is required")
        for name, model in self.models.items():
            if model.provider not in self.providers:
                raise ValueError(f"models.{name}.provider: unknown provider '{model.provider}'")
            if not (model.allow_unpinned or self.allow_unpinned or is_pinned(model.id)):
                raise ValueError(
                    f"models.{name}.id: model '{name}' id '{model.id}' is an unpinned alias (it can change"
                    " under you); pin a dated version or set allow_unpinned: true"
                )
        for route, chain in self.routes.items():
            if not chain:
                raise ValueError(f"routes.{route}: a route needs at least one model")
            for i, name in enumerate(chain):
                if name not in self.models:
                    raise ValueError(f"routes.{route}[{i}]: unknown model '{name}'")
        return self


def load_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> GatewayConfig:
    """Parse and validate a config file (``.yaml``/``.yml``/``.json``) or an already-loaded dict."""
    source_dir = None
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read model config {path}: {exc.strerror}") from exc
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise ConfigError(f"model config {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
        source_dir = path.resolve().parent
    if not isinstance(data, dict):
        raise ConfigError("model config: expected a mapping at the top level")
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("invalid model config: " + "; ".join(_describe(e) for e in exc.errors())) from None
    config._source_dir = source_dir
    return config


def _describe(error: Any) -> str:
    """One pydantic error as ``field.path: message`` (input values left out: they may be secrets)."""
    loc = ".".join(str(p) for p in error["loc"])
    msg = str(error["msg"]).removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc and not msg.startswith(f"{loc}") else msg


def build_gateway(
    config: GatewayConfig | Mapping[str, Any],
    *,
    client: httpx.AsyncClient | None = None,
    environ: Mapping[str, str] | None = None,
) -> Gateway:
    """Construct the providers' models used by some route, and the gateway over them."""
    if not isinstance(config, GatewayConfig):
        config = load_config(config)
    # The variables a config names for its keys (``api_key_env``): secrets, not service settings.
    env = os.environ if environ is None else environ
    timeouts = Timeouts(**config.timeouts.model_dump())
    built: dict[str, ChatModel] = {}
    routes: dict[str, list[ChatModel]] = {}
    for route, chain in config.routes.items():
        for name in chain:
            if name not in built:  # one instance per model: shared breaker, shared connection pool
                built[name] = _build_model(config, name, client, env, timeouts)
        routes[route] = [built[name] for name in chain]
    return Gateway(
        routes,
        retry=RetryPolicy(**config.retry.model_dump()),
        breaker=BreakerPolicy(**config.breaker.model_dump()),
        timeouts=timeouts,
    )


# Keyword arguments given to a chat class only when the config sets them (else its defaults hold).
class _WindowOption(TypedDict, total=False):
    context_window: int


class _AnthropicOptions(_WindowOption, total=False):
    base_url: str


def _build_model(
    config: GatewayConfig, name: str, client: httpx.AsyncClient | None, env: Mapping[str, str], timeouts: Timeouts
) -> ChatModel:
    spec = config.models[name]
    provider = config.providers[spec.provider]
    if provider.kind == "scripted":
        model = ScriptedModel(spec.id, latency_s=provider.latency_ms / 1000)
        if spec.context_window:
            model.context_window = spec.context_window
        return model
    key = _api_key(spec.provider, provider, env, config._source_dir)
    window: _WindowOption = {"context_window": spec.context_window} if spec.context_window else {}
    try:
        if provider.kind == "openai":
            from mesh_llm.openai import OpenAIChat  # lazy: only configs that use it need it

            return OpenAIChat(
                spec.id,
                base_url=provider.base_url or "",
                api_key=key,
                timeouts=timeouts,
                client=client,
                extra_headers=provider.extra_headers,
                extra_query=provider.extra_query,
                **window,
            )
        from mesh_llm.anthropic import AnthropicChat

        options: _AnthropicOptions = {}
        if spec.context_window:
            options["context_window"] = spec.context_window
        if provider.base_url:
            options["base_url"] = provider.base_url
        return AnthropicChat(spec.id, api_key=key, timeouts=timeouts, client=client, **options)
    except ImportError as exc:
        raise ConfigError(f"providers.{spec.provider}: kind '{provider.kind}' is not available: {exc}") from exc


def _api_key(name: str, provider: ProviderConfig, env: Mapping[str, str], source_dir: Path | None) -> str:
    """The provider's key from its variable or file; errors name the variable/file, never a value."""
    if provider.api_key_env:
        key = env.get(provider.api_key_env, "").strip()
        if not key:
            raise ConfigError(
                f"providers.{name}.api_key_env: environment variable {provider.api_key_env} is unset or empty"
            )
        return key
    if provider.api_key_file:
        path = Path(provider.api_key_file).expanduser()
        if not path.is_absolute() and source_dir is not None:
            path = source_dir / path  # relative to the config file, not to wherever we were started
        try:
            key = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"providers.{name}.api_key_file: cannot read {path}: {exc.strerror}") from exc
        if not key:
            raise ConfigError(f"providers.{name}.api_key_file: {path} is empty")
        return key
    return ""  # a local OpenAI-compatible server often needs none


def gateway_for(
    model_config: str | os.PathLike[str] | None, model: str = "scripted", *, environ: Mapping[str, str] | None = None
) -> Gateway:
    """The gateway a service runs with: the model config file ``model_config`` when given
    (``MESH_MODEL_CONFIG``), else the built-in ``model`` (``MESH_MODEL``; only ``scripted``).
    ``environ`` holds the keys the config's providers name (default: the process environment)."""
    if model_config:
        return build_gateway(load_config(model_config), environ=environ)
    choice = model.strip() or "scripted"
    if choice == "scripted":
        # The judge on another model than the one it judges, as a real deployment would have it.
        return Gateway({"default": [ScriptedModel()], "judge": [ScriptedModel("scripted-judge")]})
    raise ConfigError(
        f"MESH_MODEL={choice!r} needs a model config: set MESH_MODEL_CONFIG to a YAML/JSON file"
        " declaring its provider, pinned model id and routes (MESH_MODEL=scripted needs none)"
    )


def from_env(environ: Mapping[str, str] | None = None) -> Gateway:
    """``gateway_for`` with ``MESH_MODEL_CONFIG`` and ``MESH_MODEL`` read from ``environ`` (default:
    the process environment), for tools outside a service (``meshctl eval calibrate``); a
    service passes its settings' values to ``gateway_for``."""
    env = os.environ if environ is None else environ
    return gateway_for(env.get("MESH_MODEL_CONFIG", "").strip(), env.get("MESH_MODEL", "scripted"), environ=env)
