"""Token counting per provider (placeholder: the ~4-characters estimate for everyone)."""

from __future__ import annotations

from mesh_llm.model import ModelRequest, count_tokens


def count_text(provider: str, model: str, text: str) -> int:
    return count_tokens(text)


def count_request(provider: str, model: str, request: ModelRequest) -> int:
    """Prompt tokens of ``request`` as ``provider`` would bill them."""
    return sum(count_text(provider, model, m.content) + 4 for m in request.messages) + sum(
        count_text(provider, model, t.name + t.description) for t in request.tools
    )
