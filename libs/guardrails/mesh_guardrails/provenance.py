"""Where each piece of a prompt came from: the one rule the guardrails rest on.

**Every byte that did not come from the tenant's goal or from a trusted service's own code is
untrusted**, whatever path it took: a retrieved passage, a tool's result *or its error*, an MCP
server's answer, another step's output written after reading such things, the checker's
feedback (which can quote all of them), a person's comment on an approval.

Text enters a prompt only as a ``Text``: made ``trusted`` from a named trusted origin (the
code that wrote it), or ``untrusted`` with the taint it carries. ``render`` puts untrusted
text inside a delimited block it cannot close, with its injection score; the taint travels
with the step that read it (declared on every tool request, inherited by steps that take its
output). Taint is a property of the text, decided where the text is made, not a list of
channels that a consumer has to remember.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mesh_contracts.v1 import Taint
from mesh_guardrails.injection import InjectionScore, delimit
from mesh_guardrails.injection import score as injection_score

TRUSTED_ORIGINS = frozenset({"system-prompt", "goal", "plan", "worker", "tool-executor", "step"})
"""Kinds of origin whose text is trusted: the worker's and the judge's prompt files, the
tenant's goal, the planner's instruction for a step (made from the goal alone), the worker's and
the tool-executor's own words (timeouts, refusals, a calculator's result), and the output of a
step whose own context held nothing untrusted (``step:<id>``)."""


@dataclass(frozen=True)
class Text:
    """A piece of prompt text and its provenance."""

    text: str
    origin: str
    """``<kind>`` or ``<kind>:<detail>``: ``plan``, ``worker``, ``http_get:s1-a1-i1-c0``, ``checker``."""
    taint: Taint | None = None
    """None for trusted text; otherwise what the text is (untrusted, its score and signals)."""
    label: str = ""
    """Trusted words put before the text (``Input from s1: ``), outside any delimiting."""

    @classmethod
    def trusted(cls, text: str, origin: str) -> Text:
        kind = origin.split(":", 1)[0]
        if kind not in TRUSTED_ORIGINS:
            raise ValueError(f"{origin!r} is not a trusted origin ({', '.join(sorted(TRUSTED_ORIGINS))})")
        return cls(text, origin)

    @classmethod
    def untrusted(
        cls, text: str, origin: str, *, score: float | None = None, signals: tuple[str, ...] = (),
        sources: tuple[str, ...] = (),
    ) -> Text:  # fmt: skip
        """Untrusted text from ``origin``. Without a ``score`` it is scored here (the injection
        detector), so no untrusted text reaches a prompt unscored."""
        if score is None:
            scored = injection_score(text)
            score, signals = scored.score, tuple(dict.fromkeys(signals + scored.signals))
        taint = Taint(untrusted=True, injection_score=round(score, 3), sources=sources or (origin,), signals=signals)
        return cls(text, origin, taint)

    @classmethod
    def tainted(cls, text: str, origin: str, taint: Taint) -> Text:
        """Text whose taint is already known (a step's output, carrying what that step read)."""
        return cls(text, origin, taint) if taint.untrusted else cls.trusted(text, origin)

    def labelled(self, label: str) -> Text:
        return replace(self, label=label)

    def render(self, nonce_seed: str = "") -> str:
        """The text as it goes into a prompt: as it is when trusted, else inside a block it cannot
        close (``injection.delimit``), labelled with its origin and score."""
        if self.taint is None or not self.taint.untrusted:
            return self.label + self.text
        score = InjectionScore(self.taint.injection_score, self.taint.signals)
        return self.label + delimit(self.text, source=self.origin, score=score, nonce_seed=nonce_seed)
