"""The root of every exception the planner raises: ``except PlannerError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class PlannerError(Exception):
    """Raised by mesh_planner (a subclass says what)."""


class NeedWorkflow(PlannerError):
    """Inside a transition of a workflow task: the definition of its pinned version (``ref``) is
    not read yet (``Planner.definition``); the transition reads it and runs again."""

    def __init__(self, ref: str) -> None:
        super().__init__(ref)
        self.ref = ref
