"""The root of every exception mesh_contracts raises: ``except ContractsError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class ContractsError(Exception):
    """Raised by mesh_contracts (a subclass says what)."""
