"""The worker's settings: the common ones, the model-calling ones (``AgentSettings``) and the
limits of its agent loop."""

from __future__ import annotations

from pydantic import Field

from mesh_agent.settings import AgentSettings


class WorkerSettings(AgentSettings):
    """Everything the worker reads."""

    tool_timeout_s: float = Field(60.0, gt=0)
    """A tool call not answered within this long (on top of the request's own timeout) becomes a
    timed-out observation; the timer is re-armed when a step resumes from its checkpoint."""
    tool_output_max_chars: int = Field(8000, gt=0)
    """Longer tool outputs are clipped with a marker in the model's context; the whole output is
    kept in KV ``steps`` under the key the marker names."""
