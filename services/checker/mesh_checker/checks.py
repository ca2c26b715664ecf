"""Property checks on a candidate answer. Each returns a named, reasoned result."""

from __future__ import annotations

import re

from mesh_contracts.v1 import CheckRequested, CheckResult

PII_PATTERNS = {
    "email address": re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),
    "phone number": re.compile(r"(?<!\d)(?:\+\d{1,3}[ -]?)?(?:\(\d{2,4}\)[ -]?)?\d{3}[ -]\d{3,4}[ -]?\d{0,4}(?!\d)"),
    "API key": re.compile(r"\b(?:sk|pk|ghp|xox[abp])[-_][A-Za-z0-9]{16,}\b"),
    "NATS seed": re.compile(r"\bS[UAO][A-Z2-7]{56}\b"),
}
REFERENCE = re.compile(r"\[([^\[\]#]+)#([^\[\]]+)\]")


def run_checks(m: CheckRequested) -> list[CheckResult]:
    answer = m.answer.strip()
    results = [
        CheckResult(name="non_empty", passed=bool(answer), reason="answer has text" if answer else "answer is empty"),
        CheckResult(
            name="length", passed=len(answer) <= m.max_length, reason=f"{len(answer)} characters (max {m.max_length})"
        ),
    ]
    if m.require_citations:
        results.append(
            CheckResult(
                name="citations_present",
                passed=bool(m.citations),
                reason=f"{len(m.citations)} citation(s)" if m.citations else "no citations",
            )
        )
    cited = {(c.doc_id, c.chunk_id) for c in m.citations}
    refs = set(REFERENCE.findall(answer))
    dangling = sorted(f"{d}#{c}" for d, c in refs - cited)
    results.append(
        CheckResult(
            name="references_resolve",
            passed=not dangling,
            reason=f"unresolved reference(s): {', '.join(dangling)}"
            if dangling
            else f"{len(refs)} reference(s), all backed by a citation",
        )
    )
    found = [kind for kind, rx in PII_PATTERNS.items() if rx.search(answer)]
    results.append(
        CheckResult(
            name="no_pii",
            passed=not found,
            reason=f"contains {', '.join(found)}" if found else "no PII or secrets found",
        )
    )
    return results
