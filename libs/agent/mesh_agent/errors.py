"""The root of every exception mesh_agent raises: ``except AgentError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class AgentError(Exception):
    """Raised by mesh_agent (a subclass says what)."""
