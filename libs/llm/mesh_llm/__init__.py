"""The minimal model interface the services call, and a deterministic scripted model.

This is the seam a later model gateway grows behind (providers, retries, fallbacks,
caching): services depend only on ``ChatModel``.
"""

from mesh_llm.errors import AllModelsFailed, CircuitOpen, ConfigError, ContextOverflow, ProviderError, UnknownRoute
from mesh_llm.model import (
    ChatModel,
    Message,
    ModelRequest,
    ModelResponse,
    StreamEvent,
    Timeouts,
    TokenSink,
    ToolCall,
    ToolSpec,
    count_tokens,
)
from mesh_llm.scripted import ScriptedModel

__all__ = [
    "AllModelsFailed",
    "ChatModel",
    "CircuitOpen",
    "ConfigError",
    "ContextOverflow",
    "Message",
    "ModelRequest",
    "ModelResponse",
    "ProviderError",
    "ScriptedModel",
    "StreamEvent",
    "Timeouts",
    "TokenSink",
    "ToolCall",
    "ToolSpec",
    "UnknownRoute",
    "count_tokens",
]
