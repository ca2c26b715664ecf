"""The root of every exception mesh_host raises: ``except HostError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class HostError(Exception):
    """Raised by mesh_host (a subclass says what)."""
