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
    live_window_ms: float = Field(25.0, ge=0, le=1000)
    """Streamed text that arrives within this long of the last delta sent to watching clients is
    joined into the next delta (the first goes out at once). 0 sends every provider delta on its
    own, one signed message each."""
    tool_output_max_chars: int = Field(8000, gt=0)
    """Longer tool outputs are clipped with a marker in the model's context; the whole output is
    kept in KV ``steps`` under the key the marker names."""
