"""Property checks on a task's step results and its final answer. Pure functions: each check
returns a named result with a reason an operator can act on, and a score where one exists.

What each check needs from outside the message is passed in: the passages retrieved for the
task (read by the service from the RAG stream, where the rag service signed them), keyed by
``(doc_id, chunk_id)``. A citation is only as good as that record: a chunk the planner or a
worker names but the rag service never returned for this tenant's task does not resolve.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

from mesh_contracts.v1 import CheckRequested, CheckResult, Citation, RetrievalHit, StepResult
from mesh_guardrails.redact import find as find_sensitive

REFERENCE = re.compile(r"\[([^\[\]#\s]+)#([^\[\]\s]+)\]")
WORD = re.compile(r"[a-z0-9]+")
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=\S)")
# Function words carry no claim: a sentence is grounded by its content words only.
STOP = frozenset(
    "a about above after again all also an and any are as at be because been before being between both "
    "but by can could did do does doing down during each few for from further had has have having he her "
    "here hers him his how i if in into is it its itself just me more most my no nor not now of off on once "
    "only or other our out over own same she should so some such than that the their them then there these "
    "they this those through to too under until up very was we were what when where which while who whom "
    "why will with would you your yours answer documentation document says said".split()
)
PII_KINDS = frozenset({"email", "phone", "iban", "card", "ssn", "ip"})
KIND_NAMES = {"email": "email address", "phone": "phone number", "iban": "IBAN", "card": "card number",
              "ssn": "social security number", "ip": "IP address", "api-key": "API key", "nats-seed": "NATS seed",
              "nats-creds": "NATS credentials", "private-key": "private key", "jwt": "JWT",
              "password": "password", "secret": "secret"}  # fmt: skip
# Key-shaped tokens the log redactor leaves alone (it errs towards keeping text readable); an
# answer is held to more: any sk-/pk-/ghp-style token of 16+ characters is treated as a key.
KEY_LIKE = re.compile(r"\b(?:sk|pk|rk|ghp|xox[abp])[-_][A-Za-z0-9_-]{16,}")
MIN_CLAIM_WORDS = 3
"""A sentence with fewer content words is not judged for grounding (too short to tell)."""

Passages = Mapping[tuple[str, str], RetrievalHit]


def content_words(text: str) -> set[str]:
    """Lower-cased content words, crudely stemmed (plural s): what a claim asserts."""
    return {w.rstrip("s") if len(w) > 3 else w for w in WORD.findall(text.lower()) if w not in STOP and len(w) > 1}


def support(claim: str, evidence: str) -> float:
    """Share of the claim's content words found in the evidence (lexical support, 0..1)."""
    words = content_words(claim)
    return len(words & content_words(evidence)) / len(words) if words else 1.0


@dataclass(frozen=True)
class Claim:
    text: str
    refs: tuple[tuple[str, str], ...]


TRAILING_REFS = re.compile(r"([.!?])((?:\s*\[[^\[\]#\s]+#[^\[\]\s]+\])+)")


def claims(text: str) -> list[Claim]:
    """Sentences of ``text`` with the ``[doc#chunk]`` references each carries (references
    written after a sentence's full stop belong to that sentence)."""
    text = TRAILING_REFS.sub(r"\2\1", text.strip())  # "Claim. [d#1]" -> "Claim [d#1]."
    out: list[Claim] = []
    for raw in SENTENCE.split(text):
        refs = tuple(REFERENCE.findall(raw))
        body = re.sub(r"\s+([.!?,;:])", r"\1", REFERENCE.sub("", raw)).strip()
        if body:
            out.append(Claim(body, refs))
    return out


def _result(name: str, passed: bool, reason: str, step_id: str, score: float | None = None) -> CheckResult:
    return CheckResult(name=name, passed=passed, reason=reason, step_id=step_id, score=score)


def check_schema(text: str, schema: dict[str, Any] | None, step_id: str) -> CheckResult | None:
    if schema is None:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        return _result("schema", False, f"output is not JSON ({exc.msg} at line {exc.lineno})", step_id)
    try:
        jsonschema.validate(doc, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return _result("schema", False, f"at {where}: {exc.message[:200]}", step_id)
    except jsonschema.SchemaError as exc:
        return _result("schema", False, f"the declared schema is invalid: {exc.message[:200]}", step_id)
    return _result("schema", True, "matches the declared schema", step_id)


def check_citations_resolve(citations: Iterable[Citation], passages: Passages, step_id: str) -> CheckResult:
    bad: list[str] = []
    n = 0
    for c in citations:
        n += 1
        hit = passages.get((c.doc_id, c.chunk_id))
        if hit is None:
            bad.append(f"{c.doc_id}#{c.chunk_id} was not retrieved for this task")
        elif hit.chunk_hash != c.chunk_hash or hit.version != c.version:
            bad.append(f"{c.doc_id}#{c.chunk_id} does not match the retrieved chunk (version or hash differs)")
    if bad:
        return _result("citations_resolve", False, "; ".join(bad[:5]), step_id)
    return _result(
        "citations_resolve", True, f"{n} citation(s), each a chunk retrieved for this tenant's task", step_id
    )


def check_references(text: str, citations: Iterable[Citation], step_id: str) -> CheckResult:
    cited = {(c.doc_id, c.chunk_id) for c in citations}
    refs = set(REFERENCE.findall(text))
    dangling = sorted(f"{d}#{c}" for d, c in refs - cited)
    if dangling:
        return _result("references_resolve", False, f"unresolved reference(s): {', '.join(dangling)}", step_id)
    return _result("references_resolve", True, f"{len(refs)} reference(s), all backed by a citation", step_id)


def check_grounded(
    text: str, passages: Passages, evidence: str, min_support: float, step_id: str, *, require_refs: bool
) -> CheckResult | None:
    """Each claim carrying references must be supported by the passages it cites. When the text
    owes citations (it builds on documents), a claim without a reference must be supported by
    the task's other evidence (other steps' outputs, every retrieved passage); otherwise such a
    claim rests on what the checker cannot see (a note, a web page, a tool's result) and is
    left to the judge. ``None`` when the text makes no claim long enough to judge."""
    worst: tuple[float, str, str] | None = None
    judged = 0
    for claim in claims(text):
        if len(content_words(claim.text)) < MIN_CLAIM_WORDS:
            continue
        judged += 1
        if claim.refs:
            cited = " ".join(passages[r].text for r in claim.refs if r in passages)
            score, basis = support(claim.text, cited), ", ".join(f"{d}#{c}" for d, c in claim.refs)
        elif require_refs:  # a document-based answer: an unreferenced claim must rest on the evidence
            score, basis = support(claim.text, evidence), "the task's evidence"
        else:
            continue
        if worst is None or score < worst[0]:
            worst = (score, claim.text, basis)
    if not judged or worst is None:
        return None
    score, claim_text, basis = worst
    if score < min_support:
        return _result(
            "grounded",
            False,
            f"claim {claim_text[:120]!r} has support {score:.2f} in {basis} (min {min_support:.2f})",
            step_id,
            round(score, 3),
        )
    return _result(
        "grounded",
        True,
        f"{judged} claim(s), lowest support {score:.2f} (min {min_support:.2f})",
        step_id,
        round(score, 3),
    )


def _given(value: str, goal: str) -> bool:
    """``value`` is in the goal as a whole value, not inside a longer one: ``ops@acme.com`` is not
    given by a goal that names ``ops@acme.com.au``, nor ``s@acme.com`` by one naming ``ops@acme.com``."""
    return re.search(rf"(?<![\w.@+-]){re.escape(value)}(?![\w@-]|\.\w)", goal) is not None


def check_sensitive(text: str, goal: str, step_id: str) -> CheckResult:
    """No secrets ever; no PII unless the tenant's own goal gave that value (an address the
    user asked to be mailed is not a leak). The reason names kinds, never the values."""
    goal_l = goal.lower()
    found: dict[str, int] = {}
    matches = find_sensitive(text)
    if not any(kind == "api-key" for kind, _ in matches):
        matches += [("api-key", k) for k in KEY_LIKE.findall(text)]
    for kind, value in matches:
        if kind in PII_KINDS and _given(value.lower(), goal_l):
            continue
        name = KIND_NAMES.get(kind, kind)
        found[name] = found.get(name, 0) + 1
    if found:
        listed = ", ".join(f"{k}" + (f" ({n})" if n > 1 else "") for k, n in found.items())
        return _result("no_pii", False, f"contains {listed} not given in the goal", step_id)
    return _result("no_pii", True, "no PII or secrets beyond what the goal gave", step_id)


def check_forbidden(text: str, terms: Iterable[str], step_id: str) -> CheckResult | None:
    terms = [t for t in terms if t.strip()]
    if not terms:
        return None
    hits = [t for t in terms if re.search(rf"(?<!\w){re.escape(t.strip())}(?!\w)", text, re.I)]
    if hits:
        return _result("no_forbidden_terms", False, f"contains forbidden term(s): {', '.join(hits)}", step_id)
    return _result("no_forbidden_terms", True, f"none of {len(terms)} forbidden term(s)", step_id)


def check_step(step: StepResult, m: CheckRequested, passages: Passages) -> list[CheckResult]:
    sid = step.step_id
    out = [
        check_schema(step.output, step.output_schema, sid),
        check_references(step.output, step.citations, sid),
        check_citations_resolve(step.citations, passages, sid) if step.citations else None,
        check_grounded(step.output, passages, "", m.policy.grounding_min_support, sid, require_refs=False),
        check_sensitive(step.output, m.goal, sid),
        check_forbidden(step.output, m.policy.forbidden_terms, sid),
    ]
    return [r for r in out if r is not None]


def evidence_of(m: CheckRequested, passages: Passages) -> list[str]:
    """What the answer may rest on: every passage retrieved for the task and the other steps'
    outputs (an unreferenced claim's support; the judge's evidence)."""
    texts = [h.text for h in passages.values()] + [s.output for s in m.steps if s.step_id != m.answer_step]
    return [t for t in texts if t.strip()]


def check_answer(m: CheckRequested, passages: Passages) -> list[CheckResult]:
    answer, policy = m.answer.strip(), m.policy
    max_length = min(m.max_length, policy.max_length)
    refs = set(REFERENCE.findall(answer))
    cited_refs = refs & {(c.doc_id, c.chunk_id) for c in m.citations}
    out: list[CheckResult | None] = [
        _result("non_empty", bool(answer), "answer has text" if answer else "answer is empty", ""),
        _result(
            "length",
            policy.min_length <= len(answer) <= max_length,
            f"{len(answer)} characters (bounds {policy.min_length}..{max_length})",
            "",
        ),
        check_schema(answer, policy.output_schema, ""),
    ]
    if m.require_citations:
        retrieved = len(passages) or len(m.citations)
        out.append(
            _result(
                "citations_present",
                bool(cited_refs),
                f"cites {len(cited_refs)} retrieved passage(s)"
                if cited_refs
                else f"the task retrieved {retrieved} passage(s) but the answer cites none",
                "",
            )
        )
    out.append(check_references(answer, m.citations, ""))
    used = [c for c in m.citations if (c.doc_id, c.chunk_id) in refs]
    out.append(check_citations_resolve(used, passages, ""))
    out.append(
        check_grounded(
            answer,
            passages,
            "\n".join(evidence_of(m, passages)),
            policy.grounding_min_support,
            "",
            require_refs=m.require_citations,
        )
    )
    out.append(check_sensitive(answer, m.goal, ""))
    out.append(check_forbidden(answer, policy.forbidden_terms, ""))
    return [r for r in out if r is not None]


def run_checks(m: CheckRequested, passages: Passages | None = None) -> list[CheckResult]:
    """Every property check: each step result's, then the final answer's."""
    passages = passages if passages is not None else {}
    results: list[CheckResult] = []
    for step in m.steps:
        if step.step_id != m.answer_step:  # the answer step's output is the answer, checked below
            results += check_step(step, m, passages)
    return results + check_answer(m, passages)
