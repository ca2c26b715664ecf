"""The root of every exception mesh_testing raises: ``except TestingError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class TestingError(Exception):
    """Raised by mesh_testing (a subclass says what)."""
