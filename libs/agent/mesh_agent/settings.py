"""Settings of the services that call models (the planner, the worker, the checker).

``AgentSettings`` holds what every model call needs besides the mesh: the gateway's
configuration, the context strategy, the response cache, prompt overrides and the price
table. Each of the three services subclasses it; ``metered.configured``, ``prompts.load`` and
``prices.current`` take their values from it, never from the environment.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from mesh_kit.settings import OptionalPath, ServiceSettings


class AgentSettings(ServiceSettings):
    """The common settings plus what a model-calling service reads."""

    model: str = "scripted"
    """The built-in model to run when there is no model config: only ``scripted`` (deterministic,
    no provider) exists; any other value without ``MESH_MODEL_CONFIG`` fails at start-up."""
    model_config_file: OptionalPath = Field(None, validation_alias="MESH_MODEL_CONFIG")
    """YAML/JSON model config: providers, pinned model ids, routes (a ``judge`` route picks the
    checker's judge), retries, breakers, timeouts (``libs/llm/README.md``). Wins over ``MESH_MODEL``."""
    context_strategy: Literal["error", "drop_oldest", "summarise"] = "error"
    """A request that overflows the model's window: fails the call with the numbers (``error``),
    or loses its oldest turns (``drop_oldest``) or has them summarised (``summarise``), with a
    ``context.trimmed`` progress event."""
    llm_cache: bool = True
    """Answer a repeated identical cacheable request from Redis instead of the provider (needs
    the Redis URL); ``off`` turns it off."""
    llm_cache_ttl_s: float = Field(3600.0, gt=0)
    """How long a cached answer is served."""
    prompts_dir: OptionalPath = None
    """Directory of prompt overrides: a file ``<id>.md`` (same format, same id) replaces the
    packaged prompt of that id when the service starts, without a rebuild."""
    price_table_file: OptionalPath = None
    """JSON price table (``{"version": ..., "prices": {"provider/model": {...}}}``) replacing the
    built-in one; a call to a model it does not price is refused."""
    genai_capture_content: bool = Field(False, validation_alias="OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT")
    """OpenTelemetry's switch (``true``, ``1`` or ``yes``; anything else is off): put the
    PII-redacted prompts and answers on the GenAI spans."""

    @field_validator("model", mode="before")
    @classmethod
    def _blank_is_scripted(cls, v: Any) -> Any:
        return (v.strip() or "scripted") if isinstance(v, str) else v

    @field_validator("genai_capture_content", mode="before")
    @classmethod
    def _otel_flag(cls, v: Any) -> Any:
        return v.lower() in ("1", "true", "yes") if isinstance(v, str) else v
