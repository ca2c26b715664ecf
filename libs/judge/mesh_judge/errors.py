"""The root of every exception mesh_judge raises: ``except JudgeError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class JudgeError(Exception):
    """Raised by mesh_judge (a subclass says what)."""
