"""The checker's settings: the common ones and the model-calling ones (``AgentSettings``)."""

from __future__ import annotations

from mesh_agent.settings import AgentSettings


class CheckerSettings(AgentSettings):
    """Everything the checker reads. It has no setting of its own: what an answer is held to
    (checks, judge, rubric, minimum score) is the task's policy. Its judge runs on the model
    config's ``judge`` route when there is one."""
