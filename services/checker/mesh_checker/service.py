"""Checker: a verdict, check by check, on every step result and final answer of a task.

1. Property checks (``checks.py``) on each step result and on the answer, against the passages
   the rag service actually returned for this tenant's task (handed on in the check request
   exactly as rag signed them, and verified: a citation the worker or planner made up does not
   resolve; the checker itself reads no stream and so no other tenant's documents).
2. When every property check passes and the task's policy wants it, the LLM judge grades the
   answer against the policy's rubric (``judge.py``), through the budgeted gateway, on a model
   other than the ones that wrote the answer when the judge route has one.
3. The verdict carries every check's result, reason and score, the judge's model and score,
   and the prompt versions involved; the same numbers become OpenTelemetry metrics per
   tenant, agent and prompt version (online evaluation).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import mesh_judge as jd
from mesh_agent import genai, prompts, releases
from mesh_agent.metered import BudgetExceeded, Models, call_model_once, configured
from mesh_checker import metrics as checker_metrics
from mesh_checker.checks import Passages, check_answer, evidence_of, run_checks
from mesh_checker.settings import CheckerSettings
from mesh_contracts import ContractError
from mesh_contracts.v1 import CheckRequested, CheckResult, CheckVerdict, RetrievalCompleted, TokenUsage
from mesh_durable import guard, ledger, records
from mesh_durable.ledger import Ledger
from mesh_host import Mesh
from mesh_identity import IdentityError
from mesh_kit import Delivery
from mesh_kit import telemetry as tel
from mesh_llm import ChatModel
from mesh_llm.errors import ProviderError
from mesh_llm.gateway import Gateway, model_key
from mesh_tenancy import tenancy

log = logging.getLogger("mesh.checker")

PassageSource = Callable[[CheckRequested, float | None], Awaitable[Passages]]


class Checker:
    def __init__(
        self,
        mesh: Mesh,
        models: ChatModel | Models | None = None,
        passages: PassageSource | None = None,
        settings: CheckerSettings | None = None,
    ) -> None:
        self.mesh = mesh
        self.settings = settings if settings is not None else CheckerSettings.defaults()
        self.models = Models.of(models) if models is not None else None
        self.judge_prompts = jd.JudgePrompts.load(self.settings.prompts_dir)
        self.passages = passages or self.retrieved
        self.ledger: Ledger | None = None
        self.bundles = records.Bundles(None)  # the releases bucket, from start()
        self._judges: dict[tuple[str, ...], Models] = {}
        meter = mesh.meter
        self._verdicts = meter.create_counter(checker_metrics.M_CHECK_VERDICTS, unit="{verdict}")
        self._results = meter.create_counter(checker_metrics.M_CHECK_RESULTS, unit="{check}")
        self._judge_score = meter.create_histogram(checker_metrics.M_CHECK_JUDGE_SCORE, unit="1")
        self._grounding = meter.create_histogram(checker_metrics.M_CHECK_GROUNDING, unit="1")

    async def start(self) -> None:
        if self.models is None:
            self.models = configured(self.mesh, self.settings)
        self.ledger = await ledger.calls(self.mesh)
        self.bundles = records.Bundles(await self.mesh.kv("releases"))

    def register(self) -> None:
        guard.enable(self.mesh)
        self.mesh.on_start(self.start)
        self.mesh.consume(CheckRequested, self.on_request)

    # --- what was retrieved ---------------------------------------------------------------

    async def retrieved(self, m: CheckRequested, at: float | None = None) -> Passages:
        """Every passage the rag service returned for this task: the retrieval records the check
        request carries, each exactly as rag signed it and verified here (rag produced it, for
        this tenant and task, while the task existed, with a key valid then). The checker reads
        no stream: it sees no other tenant's documents, and a citation the worker or planner
        made up, or a passage they altered, does not resolve."""
        out: dict[tuple[str, str], Any] = {}
        not_after = at if at is not None else time.time()
        for step in m.steps:
            for record in step.retrievals:
                body = record.body.encode()
                try:
                    model = RetrievalCompleted.parse(body)
                    if (model.tenant, model.task_id) != (m.tenant, m.task_id):
                        raise ContractError(f"a record of {model.tenant}/{model.task_id}, not of this task")
                    await self.mesh.verify_current(
                        partial(
                            self.mesh.verifier.verify_forwarded,
                            record.token, body, model, not_before=m.started_at, not_after=not_after,
                        )
                    )  # fmt: skip
                except (ContractError, IdentityError) as exc:
                    self.mesh.count(tel.M_REJECTED)
                    log.warning("ignoring a retrieval record of step %s of %s/%s: %s", step.step_id, m.tenant,
                                m.task_id, exc)  # fmt: skip
                    continue
                assert isinstance(model, RetrievalCompleted)
                for hit in model.hits:
                    out[(hit.doc_id, hit.chunk_id)] = hit
        return out

    # --- the judge ------------------------------------------------------------------------

    def _judge_models(self, avoid: set[str]) -> Models:
        """The judge's models: its route's chain with the models that wrote the answer moved to
        the end, so another model judges whenever one is configured and healthy, and the same
        model only as the last fallback (a judge that never runs would fail every task)."""
        assert self.models is not None
        gateway = self.models.gateway
        _, chain = gateway.route_for(jd.request(jd.JudgeInput("", ""), judge_prompts=self.judge_prompts))
        ordered = [m for m in chain if model_key(m) not in avoid] + [m for m in chain if model_key(m) in avoid]
        if ordered == chain:
            return self.models
        key = tuple(model_key(m) for m in ordered)
        if key not in self._judges:
            # Same policies, a route of its own: the judge's chain in the judge's order.
            self._judges[key] = Models(
                Gateway({"default": ordered}, retry=gateway.retry, timeouts=gateway.timeouts),
                self.models.cache,
                self.models.context_strategy,
                self.models.capture_content,
                self.models.price_table,
            )
        return self._judges[key]

    async def run_judge(self, m: CheckRequested, passages: Passages, d: Delivery | None) -> tuple[CheckResult, jd.Judgement | None, TokenUsage]:  # fmt: skip
        answer_models = {x for s in m.steps if s.step_id == m.answer_step for x in s.models}
        # A replay on a named route judges on that route (of the service's whole gateway).
        assert self.models is not None
        models = self.models if m.replay is not None and m.replay.route else self._judge_models(answer_models)
        # The judge grades grounding against everything the answer was built on: what rag returned
        # and what the other steps produced (a note read, a computed result).
        bundle = await self.bundles.bundle(m.tenant, m.release)
        jp = jd.JudgePrompts(
            releases.prompt(self.judge_prompts.judge, bundle, m.release),
            releases.prompt(self.judge_prompts.rubric, bundle, m.release),
        )
        route = releases.route(bundle, "judge")
        if route and not (m.replay is not None and m.replay.route):
            models = self.models  # the release names the judge's route (of the service's whole gateway)
        if m.replay is not None and m.replay.prompts:
            try:
                jp = jd.JudgePrompts(
                    prompts.chosen(jp.judge, m.replay.prompts, self.settings.prompts_dir),
                    prompts.chosen(jp.rubric, m.replay.prompts, self.settings.prompts_dir),
                )
            except prompts.PromptError as exc:
                return CheckResult(name="judge", passed=False, reason=f"judge not run: {exc}"[:300]), None, TokenUsage()
        inp = jd.JudgeInput(m.goal, m.answer, m.policy.rubric, tuple(evidence_of(m, passages)))
        request = jd.request(inp, judge_prompts=jp)
        if route and models is self.models:
            request = dataclasses.replace(request, route=route)
        try:
            response, usage = await call_model_once(
                self.mesh, self.ledger, models, request, tenant=m.tenant, task_id=m.task_id,
                step_id=m.node or "check", call_id=f"judge-{m.node + '-' if m.node else ''}{m.attempt}", delivery=d,
                replay=m.replay,
            )  # fmt: skip
            verdict = jd.parse(
                response.content,
                min_score=m.policy.judge_min_score,
                model=f"{response.provider}/{response.model}",
                prompt_version=jp.judge.ref,
            )
        except BudgetExceeded as exc:
            return (
                CheckResult(name="judge", passed=False, reason=f"judge not run: {exc.describe()}"),
                None,
                TokenUsage(),
            )
        except (ProviderError, jd.JudgeReplyError) as exc:  # fail closed: an unjudged answer is not a passed one
            return CheckResult(name="judge", passed=False, reason=f"judge failed: {exc}"[:300]), None, TokenUsage()
        why = "; ".join(verdict.reasons[:3]) or "no reasons given"
        same = (
            " (the model that wrote the answer: no other judge model answered)"
            if verdict.model in answer_models
            else ""
        )
        reason = f"{verdict.model} scored {verdict.score:.2f} (min {m.policy.judge_min_score:.2f}){same}: {why}"
        return (
            CheckResult(name="judge", passed=verdict.passed, reason=reason[:600], score=verdict.score),
            verdict,
            usage,
        )

    # --- the verdict ----------------------------------------------------------------------

    async def on_request(self, m: CheckRequested, d: Delivery) -> None:
        passages = await self.passages(m, d.stored_at if d is not None else None)
        # A workflow's check node: the output it checks (the answer), not the steps before it.
        checks = check_answer(m, passages) if m.node else run_checks(m, passages)
        judge = m.policy.judge
        if m.only:  # the checks named alone decide
            checks, judge = [c for c in checks if c.name in m.only], "judge" in m.only
        judgement, usage = None, TokenUsage()
        if judge and all(c.passed for c in checks) and self.models is not None:
            result, judgement, usage = await self.run_judge(m, passages, d)
            checks.append(result)
        passed = all(c.passed for c in checks)
        failed = [f"{c.step_id}.{c.name}" if c.step_id else c.name for c in checks if not c.passed]
        failed_steps = tuple(dict.fromkeys(c.step_id for c in checks if not c.passed and c.step_id))
        versions = dict(m.prompt_versions)
        if judgement is not None:
            versions["judge"] = judgement.prompt_version
        self.observe(m, checks, passed, judgement)
        # The progress event first: the verdict ends the task, and a client following it stops
        # at the outcome, so an event published after the verdict could arrive too late to be seen.
        await self.mesh.progress(
            m.tenant,
            m.task_id,
            "check.verdict",
            f"passed {len(checks)} checks" + (f", judge {judgement.score:.2f}" if judgement else "")
            if passed
            else "failed " + ", ".join(failed),
            key=f"{m.node}:{m.attempt}" if m.node else str(m.attempt),
        )
        await self.mesh.publish(
            CheckVerdict(
                tenant=m.tenant,
                task_id=m.task_id,
                attempt=m.attempt,
                passed=passed,
                checks=tuple(checks),
                usage=usage,
                judge_model=judgement.model if judgement else "",
                judge_score=judgement.score if judgement else None,
                failed_steps=failed_steps,
                prompt_versions=versions,
                node=m.node,
            ),
            key=f"{m.node}:{m.attempt}" if m.node else str(m.attempt),
            causation=d.msg_id,
        )

    def observe(self, m: CheckRequested, checks: list[CheckResult], passed: bool, judgement: jd.Judgement | None) -> None:  # fmt: skip
        """Online evaluation: the verdict's numbers as metrics per tenant, agent and prompt version."""
        answer = next((s for s in m.steps if s.step_id == m.answer_step), None)
        attrs = {
            tel.A_TENANT: m.tenant,
            genai.GEN_AI_AGENT_NAME: "worker" if answer is not None else "unknown",
            genai.A_PROMPT_VERSION: (answer.prompt_version if answer is not None else "") or "unknown",
        }
        self._verdicts.add(1, {**attrs, "outcome": "passed" if passed else "failed"})
        for c in checks:
            self._results.add(
                1,
                {**attrs, "check": c.name, "outcome": "passed" if c.passed else "failed", "scope": "step" if c.step_id else "answer"},
            )  # fmt: skip
            if c.name == "grounded" and not c.step_id and c.score is not None:
                self._grounding.record(c.score, attrs)
        if judgement is not None:
            self._judge_score.record(judgement.score, {**attrs, "gen_ai.request.model": judgement.model})
        self.mesh.stats.counters[f"{checker_metrics.M_CHECK_VERDICTS}.{'passed' if passed else 'failed'}"] += 1


async def build(mesh: Mesh, settings: CheckerSettings) -> Checker:
    svc = Checker(mesh, settings=settings)
    tenancy.install(mesh)  # its tenants' doors and quotas (mesh_tenancy)
    svc.register()
    return svc
