"""The release a task runs, as a service reads it (issue 41).

Every message of a task carries the version of its tenant's behaviour it runs
(``Contract.release``; '' : the packaged behaviour). A service that makes model calls or tool
calls for the task reads that version's bundle (``mesh_kit.state.Bundles``: once per version per
process, a version never changes) and takes from it, with the helpers here,

- the prompt of an id (``prompt``): the bundle's text in place of the packaged prompt, with the
  bundle's version label and the release in its ref, so every model call records which;
- the model route of an agent at a difficulty (``route``);
- the tools no step may call (``denied``).
"""

from __future__ import annotations

from mesh_agent.prompts import Prompt
from mesh_contracts.v1.release import ReleaseBundle


def prompt(packaged: Prompt, bundle: ReleaseBundle | None, release: str) -> Prompt:
    """The prompt of ``packaged``'s id a task on ``release`` uses: the bundle's, or the packaged one."""
    if bundle is None or packaged.id not in bundle.prompts:
        return packaged
    p = bundle.prompts[packaged.id]
    return Prompt(packaged.id, p.version, p.text, f"release {release}", packaged.description)


def route(bundle: ReleaseBundle | None, agent: str, difficulty: str = "") -> str:
    """The route a task's ``agent`` calls take under ``bundle`` ('' : the gateway's own routing)."""
    return bundle.route_for(agent, difficulty) if bundle is not None else ""


def denied(bundle: ReleaseBundle | None) -> frozenset[str]:
    return frozenset(bundle.tools.deny) if bundle is not None else frozenset()
