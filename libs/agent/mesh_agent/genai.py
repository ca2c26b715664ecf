"""The OpenTelemetry GenAI names a model call is recorded under, and the two GenAI client
histograms (token usage, operation duration) the standard LLM dashboards and alerts read.

Recorded by the side that calls a model (``mesh_agent.metered``, per attempt) and by the checker's
judge spans; the bus runtime knows nothing of models (its names are ``mesh_kit.telemetry``'s).
"""

from __future__ import annotations

import weakref
from typing import Any

from mesh_kit import telemetry as tel

# The mesh's own attributes of a model call's span.
A_ATTEMPT = "mesh.llm.attempt"  # 1-based attempt number within one logical model call
A_ROUTE = "mesh.llm.route"  # the gateway route (tier) the call took
A_PROMPT_VERSION = "mesh.prompt.version"  # <prompt id>@<version>+<digest> of the prompt a call was built from

# GenAI semantic-convention names, as plain strings: the semconv package constants moved
# to the GenAI conventions repository and are marked deprecated.
GEN_AI_OPERATION = "gen_ai.operation.name"
GEN_AI_PROVIDER = "gen_ai.provider.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"  # only with content capture on, PII-redacted
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"

# The OTel GenAI client metrics (semantic conventions), recorded by the side that calls a model
# (mesh_agent.metered), per attempt: the standard dashboards and alerts for LLM clients read these.
M_GEN_AI_TOKEN_USAGE = "gen_ai.client.token.usage"  # noqa: S105 - a metric name; histogram {token} by gen_ai.token.type
M_GEN_AI_DURATION = "gen_ai.client.operation.duration"  # histogram s; error.type on a failed attempt
GEN_AI_TOKEN_TYPE = "gen_ai.token.type"  # noqa: S105 - an attribute name (input | output)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
"""The bucket boundaries the GenAI semantic conventions advise."""


class GenAIMetrics:
    """The two GenAI client histograms of one meter."""

    def __init__(self, meter: Any) -> None:
        self.tokens = meter.create_histogram(
            M_GEN_AI_TOKEN_USAGE, unit="{token}", description="Number of input and output tokens used",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS,
        )  # fmt: skip
        self.duration = meter.create_histogram(
            M_GEN_AI_DURATION, unit="s", description="GenAI operation duration",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )  # fmt: skip

    def record(
        self, *, provider: str, request_model: str, elapsed_s: float, response_model: str = "",
        input_tokens: int = 0, output_tokens: int = 0, error_type: str = "", operation: str = "chat",
        release: str = "",
    ) -> None:  # fmt: skip
        attrs = {GEN_AI_OPERATION: operation, GEN_AI_PROVIDER: provider, GEN_AI_REQUEST_MODEL: request_model}
        if release:  # which release of the tenant's behaviour made the call (a canary against the current one)
            attrs[tel.A_RELEASE] = release
        if response_model:
            attrs[GEN_AI_RESPONSE_MODEL] = response_model
        if error_type:
            self.duration.record(elapsed_s, {**attrs, tel.ERROR_TYPE: error_type})
            return
        self.duration.record(elapsed_s, attrs)
        self.tokens.record(input_tokens, {**attrs, GEN_AI_TOKEN_TYPE: "input"})
        self.tokens.record(output_tokens, {**attrs, GEN_AI_TOKEN_TYPE: "output"})


_OF: weakref.WeakKeyDictionary[Any, GenAIMetrics] = weakref.WeakKeyDictionary()


def of(mesh: Any) -> GenAIMetrics:
    """The GenAI histograms of ``mesh``'s meter: made once per meter (one service process has one)."""
    meter = mesh.meter
    if (metrics := _OF.get(meter)) is None:
        metrics = _OF[meter] = GenAIMetrics(meter)
    return metrics
