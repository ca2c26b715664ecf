"""The planner's settings: the common ones and the model-calling ones (``AgentSettings``)."""

from __future__ import annotations

from mesh_agent.settings import AgentSettings


class PlannerSettings(AgentSettings):
    """Everything the planner reads. It has no setting of its own: a task's limits and policy
    come with the task."""
