"""The root of every exception the tool-executor raises: ``except ToolExecutorError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class ToolExecutorError(Exception):
    """Raised by mesh_tool_executor (a subclass says what)."""
