"""LLM-as-judge: the request the judge model gets and how its reply is read.

Shared by the checker service (online, through the budgeted model gateway) and by
``meshctl eval calibrate`` (offline, against human-labelled answers), so the judge that is
calibrated is the judge that runs. Both use the packaged prompts unless handed others
(``JudgePrompts.load``: the checker loads its ``MESH_PROMPTS_DIR`` overrides when it is built).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from mesh_agent import prompts
from mesh_agent.prompts import Prompt
from mesh_guardrails.provenance import Text
from mesh_judge.errors import JudgeError
from mesh_llm import ChatModel, Message, ModelRequest


@dataclass(frozen=True)
class JudgePrompts:
    """The judge's prompt and the rubric it applies when a task's policy gives none."""

    judge: Prompt
    rubric: Prompt

    @classmethod
    def load(cls, override_dir: str | Path | None = None) -> JudgePrompts:
        """The packaged prompts, or their overrides in ``override_dir`` (``MESH_PROMPTS_DIR``)."""
        return cls(
            prompts.load("mesh_judge", "judge", override_dir), prompts.load("mesh_judge", "rubric", override_dir)
        )


PACKAGED = JudgePrompts.load()
JUDGE_PROMPT = PACKAGED.judge
DEFAULT_RUBRIC = PACKAGED.rubric
MAX_PASSAGE_CHARS = 1500
MAX_PASSAGES = 8


class JudgeReplyError(ValueError, JudgeError):
    """The judge model's reply is not the JSON verdict the prompt asks for."""


@dataclass(frozen=True)
class JudgeInput:
    goal: str
    answer: str
    rubric: str = ""
    """Empty: the default rubric (``prompts/rubric.md``)."""
    passages: tuple[str, ...] = ()


@dataclass(frozen=True)
class Judgement:
    score: float
    """0..1."""
    passed: bool
    reasons: tuple[str, ...] = ()
    model: str = ""
    """``provider/model`` that judged."""
    prompt_version: str = field(default_factory=lambda: JUDGE_PROMPT.ref)


def rubric_of(inp: JudgeInput, judge_prompts: JudgePrompts = PACKAGED) -> str:
    return inp.rubric.strip() or judge_prompts.rubric.text


def request(inp: JudgeInput, *, max_tokens: int = 300, judge_prompts: JudgePrompts = PACKAGED) -> ModelRequest:
    """The judge call: the prompt (with the rubric) as system, the case as a JSON user message.
    The goal and the rubric are the tenant's; the answer (written by a model that read untrusted
    content) and every piece of evidence are untrusted and go in delimited, with their scores."""
    case = {
        "goal": inp.goal,
        "answer": Text.untrusted(inp.answer, "answer").render(nonce_seed=inp.goal),
        "passages": [
            Text.untrusted(p[:MAX_PASSAGE_CHARS], "passage").render(nonce_seed=inp.goal)
            for p in inp.passages[:MAX_PASSAGES]
        ],
    }
    return ModelRequest(
        (
            Message("system", judge_prompts.judge.render(rubric=rubric_of(inp, judge_prompts))),
            Message("user", json.dumps(case, ensure_ascii=False)),
        ),
        max_tokens=max_tokens,
        agent="judge",
        step="judge",
        temperature=0.0,
        prompt_version=judge_prompts.judge.ref,
    )


JSON_OBJECT = re.compile(r"\{.*\}", re.S)


def parse(text: str, *, min_score: float, model: str = "", prompt_version: str = "") -> Judgement:
    """Read the judge's reply. Tolerates prose or a code fence around the JSON object; a score on
    a 1-5 or 0-10 scale is normalised; a verdict and a score that disagree fail (strict)."""
    m = JSON_OBJECT.search(text or "")
    if not m:
        raise JudgeReplyError(f"judge reply has no JSON object: {text[:120]!r}")
    try:
        raw = json.loads(m.group(0))
    except json.JSONDecodeError as exc:
        raise JudgeReplyError(f"judge reply is not valid JSON ({exc.msg}): {text[:120]!r}") from None
    if not isinstance(raw, dict) or "score" not in raw:
        raise JudgeReplyError(f"judge reply has no score: {text[:120]!r}")
    try:
        score = float(raw["score"])
    except (TypeError, ValueError):
        raise JudgeReplyError(f"judge score {raw['score']!r} is not a number") from None
    if score > 1.0:
        score = score / 5.0 if score <= 5.0 else score / 10.0
    score = min(1.0, max(0.0, score))
    verdict = str(raw.get("verdict", "")).strip().lower()
    reasons = raw.get("reasons", ())
    if isinstance(reasons, str):
        reasons = (reasons,)
    reasons = tuple(str(r)[:300] for r in reasons if str(r).strip())[:10]
    passed = score >= min_score and verdict != "fail"
    return Judgement(round(score, 4), passed, reasons, model, prompt_version or JUDGE_PROMPT.ref)


async def judge_with(
    model: ChatModel, inp: JudgeInput, *, min_score: float = 0.6, judge_prompts: JudgePrompts = PACKAGED
) -> Judgement:
    """Judge one case with ``model`` directly (no mesh, no budget): what calibration uses."""
    response = await model.complete(request(inp, judge_prompts=judge_prompts))
    return parse(
        response.content,
        min_score=min_score,
        model=f"{response.provider}/{response.model}",
        prompt_version=judge_prompts.judge.ref,
    )
