"""The root of every exception mesh_durable raises: ``except DurableError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class DurableError(Exception):
    """Raised by mesh_durable (a subclass says what)."""
