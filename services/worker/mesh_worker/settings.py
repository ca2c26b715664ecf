"""The worker's settings: the common ones, the model-calling ones (``AgentSettings``) and the
limits of its agent loop."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mesh_agent.settings import AgentSettings
from mesh_contracts.base import POOL_PATTERN


class WorkerSettings(AgentSettings):
    """Everything the worker reads."""

    worker_pool: str = Field("", pattern=POOL_PATTERN)
    """The worker pool this deployment is (issue 48): it runs the steps of the agent profiles that
    name the pool, and no others, from the pool's own durables, as the identity ``worker-<pool>``
    (``meshctl pool add``). '' : a shared worker (every step of no pool)."""
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
    retrieve_first: bool = True
    """A step that offers ``search_docs`` retrieves before its first model turn: the step's
    instruction is the query (tenant-scoped, with the same provenance, citations and injection
    tainting as a search the model asks for), and the model answers with the passages in its
    context. Grounding then does not depend on the model choosing to search (a small or cheap
    model often does not); a model that can call tools may still search more. True is the
    default; False: the model decides whether to search."""
    retrieve_first_top_k: int = Field(3, ge=1, le=20)
    """How many passages that first retrieval asks for."""
    answer_style: Literal["written", "quoted"] = "written"
    """How a step answers from cited text (the passages it retrieved, an earlier step's cited
    answer) when it has no other tool to call. ``written``: the model writes the answer.
    ``quoted``: the model chooses up to three sentences of that text, held by the request's
    schema to quote them verbatim, and the worker writes them out each with its ``[doc#chunk]``
    (``mesh_llm.quotes``): grounded and cited by construction, for a model too small to write
    a grounded answer (the local demo's). A step without cited text, or with a tool to call
    or a schema of its own, is answered as written either way."""
