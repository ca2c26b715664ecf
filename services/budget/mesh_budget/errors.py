"""The root of every exception the budget service raises: ``except BudgetError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class BudgetError(Exception):
    """Raised by mesh_budget (a subclass says what)."""
