"""Releases of agent behaviour (issue 41): prompts, model routes and tool rules as data.

A *release bundle* is what a tenant's tasks behave by, apart from the code: the text of each
prompt (by prompt id), which model route each agent takes (by ``agent`` or
``agent:difficulty``, naming a route of the deployment's model config: a chain of pinned models
with its fallbacks) and the tools no step may call. A bundle is written by people (YAML or
JSON), validated strictly, and named by its content: ``digest()`` is the SHA-256 of its canonical
JSON, 16 hex digits, so a version cannot change and the same bundle is the same version anywhere.

A tenant's releases live in the planner's ``releases`` bucket (``records.ReleaseVersion``,
``records.ReleaseChannel``): an author drafts a version (``release.change``, action ``draft``),
records its evaluation (``evaluated``: the golden set through the real mesh with the version
pinned), and one of the tenant's approvers starts a canary (a share of new tasks, sticky per
task), promotes or rolls back. The planner picks each new task's version when it admits it,
records it on the task and on every message of the task (``Contract.release``): the worker, the
checker and the tool-executor read that version's bundle. A running canary is decided by a
sequential test on the tasks' outcomes (``mesh_planner.canary``), announced as
``release.decided``.

The version ``""`` is the packaged behaviour: the prompts shipped in the services' images.

**The mesh's default** (``GLOBAL``, the pseudo-tenant ``_mesh``): an operator (the admin identity)
drafts, records evaluations of, promotes and rolls back releases for every tenant at once. A
tenant with no current release of its own runs the mesh's current one; a tenant's own promotion
takes precedence, and a tenant's canary is compared with whichever its tasks ran before it.
Canaries are per tenant (the mesh's default changes by promotion, after a tenant's canary or an
evaluation).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mesh_contracts.base import ADMIN, APPROVER, AUTHOR, CLIENT, Contract, ContractSpec
from mesh_contracts.decode import KB
from mesh_contracts.v1.audit import MESH_WIDE

GLOBAL = MESH_WIDE
"""The pseudo-tenant of the mesh's default release (changed by the admin identity only)."""
PROMPT_IDS: tuple[str, ...] = ("planner.plan", "worker.system", "checker.judge", "checker.rubric")
"""The prompts a release may set (each service's packaged prompt of that id is replaced)."""
PLACEHOLDERS: dict[str, tuple[str, ...]] = {"planner.plan": ("max_steps", "tools"), "checker.judge": ("rubric",)}
"""What each prompt's text is rendered with (``{max_steps}``, ``{tools}``: the catalogue's tools); a text naming
another is refused."""
ROUTED_AGENTS: tuple[str, ...] = ("planner", "worker", "judge")
DIFFICULTIES: tuple[str, ...] = ("easy", "normal", "hard")
VERSION_PATTERN = r"^[0-9a-f]{16}$"
ROUTE_NAME = re.compile(r"^[A-Za-z0-9_:-]{1,64}$")
PROMPT_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,31}$")


class _Strict(BaseModel):
    """Written by people: an unknown field is a mistake to point at."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ReleasePrompt(_Strict):
    version: str = Field(pattern=PROMPT_VERSION.pattern)
    """The prompt's own version label (``4``, ``2026-11-26``): recorded with the release's version on
    every model call made with it (``<id>@<version>+<digest>``)."""
    text: str = Field(min_length=1, max_length=64 * 1024)
    """The text, with the placeholders the packaged prompt of this id has (``{max_steps}``,
    ``{rubric}``)."""


class ReleaseTools(_Strict):
    deny: tuple[str, ...] = Field((), max_length=64)
    """Tools no step of a task on this release may call: the worker does not offer them and the
    tool-executor refuses them (a denial, counted against the release)."""


class ReleaseBundle(_Strict):
    """One version of a tenant's behaviour."""

    description: str = Field("", max_length=2000)
    prompts: dict[str, ReleasePrompt] = Field({}, max_length=len(PROMPT_IDS))
    """By prompt id (``planner.plan``, ``worker.system``, ``checker.judge``, ``checker.rubric``);
    a prompt not named here is the packaged one."""
    routes: dict[str, str] = Field({}, max_length=16)
    """``agent`` or ``agent:difficulty`` (agents ``planner``, ``worker``, ``judge``) -> a route of
    the deployment's model config (``default``, ``judge``, ``strong``...): which chain of pinned
    models, with its fallbacks, serves that agent's calls. Unnamed: the gateway's own routing."""
    tools: ReleaseTools = ReleaseTools()

    @field_validator("prompts")
    @classmethod
    def _known_prompts(cls, v: dict[str, ReleasePrompt]) -> dict[str, ReleasePrompt]:
        unknown = sorted(set(v) - set(PROMPT_IDS))
        if unknown:
            raise ValueError(f"unknown prompt id(s) {unknown}: a release sets {', '.join(PROMPT_IDS)}")
        for pid, p in v.items():
            names = PLACEHOLDERS.get(pid, ())
            try:
                p.text.format(**dict.fromkeys(names, "x"))
            except (KeyError, IndexError, ValueError) as exc:
                have = ", ".join("{" + n + "}" for n in names) or "none (write { and } as {{ and }})"
                raise ValueError(f"prompt {pid}: {type(exc).__name__} {exc}: its placeholders are {have}") from None
        return v

    @field_validator("routes")
    @classmethod
    def _known_routes(cls, v: dict[str, str]) -> dict[str, str]:
        for key, route in v.items():
            agent, _, difficulty = key.partition(":")
            if agent not in ROUTED_AGENTS or (difficulty and difficulty not in DIFFICULTIES):
                raise ValueError(
                    f"route key {key!r}: an agent ({', '.join(ROUTED_AGENTS)}), optionally ':' and a difficulty "
                    f"({', '.join(DIFFICULTIES)})"
                )
            if not ROUTE_NAME.match(route):
                raise ValueError(f"routes.{key}: {route!r} is not a route name")
        return v

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """The version: SHA-256 of the canonical JSON, 16 hex digits."""
        body = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def route_for(self, agent: str, difficulty: str = "") -> str:
        """The route this release names for ``agent`` (at ``difficulty``), or '' (the gateway's own)."""
        if difficulty and f"{agent}:{difficulty}" in self.routes:
            return self.routes[f"{agent}:{difficulty}"]
        return self.routes.get(agent, "")


class CanaryTest(BaseModel):
    """A canary's sequential test (Wald's SPRT on whether a task went badly): H0, the candidate's
    bad-task rate is the current version's (``p0``); H1, it is ``p0 + min_effect``. ``alpha`` is
    the chance of rolling back a candidate that is no worse, ``beta`` of promoting one that is
    worse by ``min_effect``."""

    model_config = ConfigDict(extra="allow", frozen=True)

    alpha: float = Field(0.05, gt=0, lt=0.5)
    beta: float = Field(0.10, gt=0, lt=0.5)
    min_effect: float = Field(0.20, gt=0, lt=0.9)
    baseline_bad: float = Field(0.05, ge=0, le=1)
    """The current version's bad-task rate before the canary (its evaluation's, else 0.05): the
    prior of ``p0``, which the current version's tasks during the canary then refine."""
    max_cost_ratio: float = Field(1.5, gt=1)
    """A canary task that costs more than this times the current version's mean is a bad task."""

    def boundaries(self) -> tuple[float, float]:
        """(lower, upper) of Wald's test: promote at or below ``lower``, roll back at or above ``upper``."""
        return math.log(self.beta / (1 - self.alpha)), math.log((1 - self.beta) / self.alpha)


class ReleaseEvaluation(BaseModel):
    """The golden set run through the real mesh with one version pinned (``meshctl release eval``)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    cases: int = Field(ge=0)
    passed: int = Field(ge=0)
    """Cases whose every property held."""
    judge_mean: float | None = None
    cost_usd_mean: float = 0.0
    latency_p95_s: float = 0.0
    failing: tuple[str, ...] = Field((), max_length=200)
    """The cases that failed, ``name: why``."""
    against: str = ""
    """The version it was compared with ('' : the packaged behaviour), and how."""
    regressions: tuple[str, ...] = Field((), max_length=50)
    """What got worse beyond its tolerance (empty: the gate passed)."""
    verdict: Literal["pass", "fail"] = "pass"
    at: float = 0.0
    report: dict[str, Any] = {}
    """The evaluation's report (``mesh_eval``): the next version's evaluation compares with it, case
    by case, when this version is current."""


ReleaseAction = Literal["draft", "evaluated", "canary", "promote", "rollback"]


class ReleaseChange(Contract):
    """A tenant's author drafts a release or records its evaluation; one of its approvers starts
    a canary, promotes or rolls back.

    Signed by the person's own key (``author.<tenant>.<person>`` for ``draft`` and ``evaluated``,
    ``approver.<tenant>.<person>`` for ``canary``, ``promote`` and ``rollback``) and handed in at
    the tenant's door; the planner keeps the tenant's releases, judges the right under the newest
    trust bundle, records every change (refused ones too) on the tenant's audit chain and answers
    with ``release.changed`` on the same task id (a change id). The mesh's default release
    (tenant ``_mesh``) is changed by the operators' admin identity, straight onto the stream."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": "acme",
                    "task_id": "rel-5c1d9e",
                    "type": "release.change",
                    "action": "canary",
                    "version": "3f9a0c2b7d41e685",
                    "share": 0.3,
                    "by": "approver.acme.bob",
                    "reason": "shorter plans",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "release",
        producers=(AUTHOR, APPROVER, ADMIN),
        consumers=("planner",),
        summary="A person drafts, evaluates, canaries, promotes or rolls back a release of the tenant's behaviour.",
        max_bytes=320 * KB,
    )

    type: Literal["release.change"] = "release.change"
    action: ReleaseAction
    version: str = Field("", pattern=r"^([0-9a-f]{16})?$")
    """The version changed (``draft``: the version the author computed, checked against the
    planner's digest; empty to take the planner's)."""
    bundle: dict[str, Any] | None = None
    """``draft``: the bundle as written (the planner validates it: a refusal says why)."""
    share: float = Field(0.0, ge=0, le=1)
    """``canary``: the share of the tenant's new tasks the version serves (sticky per task)."""
    test: CanaryTest | None = None
    """``canary``: the sequential test's error rates and effect (default: ``CanaryTest()``)."""
    evaluation: ReleaseEvaluation | None = None
    """``evaluated``: the result of ``meshctl release eval``."""
    force: bool = False
    """``canary`` or ``promote`` of a version whose last evaluation did not pass (or that has none):
    allowed with a reason, and said so on the audit chain."""
    by: str = Field(min_length=1, max_length=200)
    """The identity that signed the change (checked against the message's signed identity)."""
    reason: str = Field("", max_length=2000)


class ReleaseChanged(Contract):
    """What became of a ``release.change``: applied (or already so), or refused with why."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": "acme",
                    "task_id": "rel-5c1d9e",
                    "type": "release.changed",
                    "action": "canary",
                    "version": "3f9a0c2b7d41e685",
                    "accepted": True,
                    "changed": True,
                    "current": "9d0e6b1c2a3f4e57",
                    "canary": "3f9a0c2b7d41e685",
                    "share": 0.3,
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "release-changed",
        producers=("planner",),
        consumers=(CLIENT,),
        summary="A release change applied or refused.",
        max_bytes=16 * KB,
    )

    type: Literal["release.changed"] = "release.changed"
    action: str
    version: str = ""
    accepted: bool
    changed: bool = False
    """False when nothing had to be written (the same bundle drafted again)."""
    current: str = ""
    """The version new tasks run now ('' : the packaged behaviour)."""
    canary: str = ""
    share: float = 0.0
    reason: str = ""
    """Why it was refused."""


class ReleaseDecided(Contract):
    """A canary decided: ``promoted`` (it is the current version now) or ``rolled_back`` (no new
    task runs it). Decided by the sequential test, or by an approver (``by``). What an operator
    alerts on: it is on the tenant's audit chain as well."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "tenant": "acme",
                    "task_id": "rolled_back-3f9a0c2b7d41e685-1764158400000",
                    "type": "release.decided",
                    "decision": "rolled_back",
                    "version": "3f9a0c2b7d41e685",
                    "current": "9d0e6b1c2a3f4e57",
                    "by": "sequential-test",
                    "tasks": 2,
                    "bad": 2,
                    "llr": 3.22,
                    "lower": -2.25,
                    "upper": 2.89,
                    "reason": "worse than 9d0e6b1c2a3f4e57: 2 of 2 canary tasks went badly",
                }
            ]
        }
    )
    spec: ClassVar = ContractSpec(
        "task",
        "release-decided",
        producers=("planner",),
        consumers=(CLIENT,),
        summary="A canary promoted or rolled back (by its sequential test or by a person).",
        max_bytes=16 * KB,
    )

    type: Literal["release.decided"] = "release.decided"
    decision: Literal["promoted", "rolled_back"]
    version: str = Field(pattern=VERSION_PATTERN)
    current: str
    """The version new tasks run now."""
    by: str
    """``sequential-test`` or the approver's identity."""
    tasks: int = 0
    """Canary tasks observed when it was decided."""
    bad: int = 0
    llr: float = 0.0
    """The test's log-likelihood ratio then, against its boundaries ``lower`` and ``upper``."""
    lower: float = 0.0
    upper: float = 0.0
    reason: str = ""
