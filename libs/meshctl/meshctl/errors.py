"""The root of every exception meshctl raises: ``except MeshctlError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class MeshctlError(Exception):
    """Raised by meshctl (a subclass says what)."""
