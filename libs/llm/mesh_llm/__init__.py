"""The minimal model interface the services call, and a deterministic scripted model.

This is the seam a later model gateway grows behind (providers, retries, fallbacks,
caching): services depend only on ``ChatModel``.
"""

from mesh_llm.model import ChatModel, Message, ModelRequest, ModelResponse, ToolCall, ToolSpec, count_tokens
from mesh_llm.scripted import ScriptedModel

__all__ = [
    "ChatModel",
    "Message",
    "ModelRequest",
    "ModelResponse",
    "ScriptedModel",
    "ToolCall",
    "ToolSpec",
    "count_tokens",
]
