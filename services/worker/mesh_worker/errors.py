"""The root of every exception the worker raises: ``except WorkerError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class WorkerError(Exception):
    """Raised by mesh_worker (a subclass says what)."""
