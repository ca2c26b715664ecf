"""The root of every exception mesh_tenancy raises: ``except TenancyError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class TenancyError(Exception):
    """Raised by mesh_tenancy (a subclass says what)."""
