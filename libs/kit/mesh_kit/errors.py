"""The root of every exception mesh_kit, the bus runtime raises: ``except KitError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class KitError(Exception):
    """Raised by mesh_kit (a subclass says what)."""
