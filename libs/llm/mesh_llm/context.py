"""Context discipline: make a request fit the model's window, and clip oversized tool output.

``fit`` never shortens a request silently: by default an oversized request raises
``ContextOverflow``; a caller that declares a strategy (``drop_oldest`` or ``summarise``) gets
a ``Fitted`` that says exactly what was dropped, so it can emit an event about it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

from mesh_llm.errors import ContextOverflow
from mesh_llm.model import Message, ModelRequest, ToolCall

STRATEGIES = ("error", "drop_oldest", "summarise")

# The passages a step retrieves before its model's first turn (the worker's ``retrieve_first``)
# enter its context as one message: this label, then the passages, one per paragraph as
# ``[doc#chunk] text`` (``passages``), which is also how the model is asked to cite them.
GROUNDING_LABEL = (
    "Passages retrieved for this step. Answer from them, and cite each passage you use as [doc#chunk], "
    "exactly as written before it: "
)
INPUT_LABEL = "Input from {step}: "
"""How an earlier step's output enters a step's context (the worker's ``step_context``)."""
_PASSAGE = re.compile(r"^\[([^\[\]#\s]+)#([^\[\]\s]+)\] (.*)$")

TokenCounter = Callable[[ModelRequest], int]
Summariser = Callable[[list[Message]], Awaitable[str]]

SUMMARY_PREFIX = "Summary of {n} earlier messages: "
_SENTENCE_CHARS = 160
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.DOTALL)


@dataclass(frozen=True)
class Fitted:
    """A request made to fit, and what it took.

    ``dropped`` are the original messages left out (oldest first); ``summary`` is the text
    that replaced them ('' if none); ``prompt_tokens`` counts the fitted request.
    """

    request: ModelRequest
    dropped: tuple[Message, ...] = ()
    summary: str = ""
    prompt_tokens: int = 0
    original_messages: int = 0
    dropped_tokens: int = 0
    """Tokens the dropped messages accounted for (before any summary was added back)."""
    window: int = 0
    model: str = ""

    @property
    def changed(self) -> bool:
        """Whether anything was dropped (the caller should then say so in an event)."""
        return bool(self.dropped)

    def describe(self) -> str:
        """One line for an event or a log, e.g. ``dropped 4 of 11 messages (1,234 tokens) to fit
        gpt-x's 8,192-token window; summarised``."""
        whose = f"{self.model}'s" if self.model else "the model's"
        if not self.dropped:
            return (
                f"fits: {self.prompt_tokens:,} prompt tokens + {self.request.max_tokens:,} max_tokens "
                f"within {whose} {self.window:,}-token window"
            )
        line = (
            f"dropped {len(self.dropped)} of {self.original_messages} messages ({self.dropped_tokens:,} tokens) "
            f"to fit {whose} {self.window:,}-token window"
        )
        return line + ("; summarised" if self.summary else "")


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    m = _FIRST_SENTENCE.match(text)
    s = m.group(1) if m else text
    return s if len(s) <= _SENTENCE_CHARS else s[: _SENTENCE_CHARS - 1].rstrip() + "…"


async def extractive_summary(messages: list[Message]) -> str:
    """The default summariser: deterministic and extractive, no model call.

    One short line a message: who spoke and the first sentence of what they said (a tool
    call is named with its tool). Good enough to keep the thread; pass an LLM summariser to
    ``fit`` for a real summary.
    """
    parts = []
    for m in messages:
        if m.tool_calls:
            said = "called " + ", ".join(c.name for c in m.tool_calls)
            if m.content.strip():
                said = _first_sentence(m.content) + " (" + said + ")"
        else:
            said = _first_sentence(m.content) or "(empty)"
        who = f"tool {m.name}" if m.role == "tool" and m.name else m.role
        parts.append(f"[{who}] {said}")
    return " ".join(parts)


def _units(messages: Sequence[Message]) -> list[list[int]]:
    """Group message indexes into units that are kept or dropped together: an assistant
    message with tool calls and the tool results right after it are one unit (a provider
    rejects a tool result whose call is missing, and a call without its result)."""
    units: list[list[int]] = []
    for i, m in enumerate(messages):
        # Only tool results are ever appended to a unit that opens with tool calls, so such a
        # unit is always "assistant(tool_calls), tool, tool, ...", contiguous.
        if m.role == "tool" and units and messages[units[-1][0]].tool_calls:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def _protected(messages: Sequence[Message]) -> set[int]:
    """System messages, the first user message (the task or step instruction), the latest."""
    keep = {i for i, m in enumerate(messages) if m.role == "system"}
    first_user = next((i for i, m in enumerate(messages) if m.role == "user"), None)
    if first_user is not None:
        keep.add(first_user)
    if messages:
        keep.add(len(messages) - 1)
    return keep


def _overflow(prompt: int, request: ModelRequest, window: int, model: str, hint: str) -> ContextOverflow:
    total = prompt + request.max_tokens
    return ContextOverflow(
        f"request needs {prompt:,} prompt tokens + {request.max_tokens:,} max_tokens = {total:,} > "
        f"the model's window {window:,}; {hint}",
        model=model,
    )


async def fit(
    request: ModelRequest,
    *,
    window: int,
    count: TokenCounter,
    strategy: str = "error",
    summarise: Summariser | None = None,
    model: str = "",
) -> Fitted:
    """Make ``request`` fit ``window`` tokens (prompt + ``max_tokens``) with ``strategy``.

    * ``error`` (the default): raise ``ContextOverflow`` naming the numbers.
    * ``drop_oldest``: drop the oldest turns until it fits. System messages, the first user
      message and the latest message (with the call it answers, if it is a tool result) are
      never dropped; an assistant message with tool calls goes together with its tool results. ``ContextOverflow`` if the protected messages
      alone do not fit.
    * ``summarise``: as ``drop_oldest``, but the dropped turns are replaced by one user
      message ``Summary of N earlier messages: ...`` from ``summarise`` (default
      ``extractive_summary``); more is dropped, or the summary shortened, if it does not fit.

    ``count`` gives the prompt tokens of a request (e.g. ``tokens.count_request`` bound to
    the provider and model); ``model`` only names the model in messages.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown context strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
    budget = window - request.max_tokens
    messages = request.messages
    prompt = count(request)
    if prompt <= budget:
        return Fitted(request, prompt_tokens=prompt, original_messages=len(messages), window=window, model=model)
    if budget <= 0:
        raise _overflow(prompt, request, window, model, "max_tokens alone fills the window; lower max_tokens")
    if strategy == "error":
        raise _overflow(
            prompt, request, window, model, "shorten the input or declare a context strategy (drop_oldest, summarise)"
        )

    drop = _Dropping(request, count, window, model, prompt)
    k = drop.fewest(budget)
    if strategy == "drop_oldest":
        return drop.fitted(k, "")
    return await drop.summarised(k, budget, summarise or extractive_summary)


class _Dropping:
    """``request`` with its oldest droppable units (never the protected messages) left out."""

    def __init__(self, request: ModelRequest, count: TokenCounter, window: int, model: str, prompt: int) -> None:
        self.request, self.count, self.window, self.model, self.prompt = request, count, window, model, prompt
        self.messages = request.messages
        protected = _protected(self.messages)
        self.droppable = [u for u in _units(self.messages) if not protected.intersection(u)]

    def without(self, k: int, summary: str = "") -> ModelRequest:
        """``request`` minus the oldest ``k`` droppable units, the summary in their place."""
        gone = {i for u in self.droppable[:k] for i in u}
        kept: list[Message] = []
        for i, m in enumerate(self.messages):
            if i in gone:
                if summary and i == self.droppable[0][0]:
                    kept.append(Message("user", SUMMARY_PREFIX.format(n=len(gone)) + summary))
                continue
            kept.append(m)
        return replace(self.request, messages=tuple(kept))

    def fewest(self, budget: int) -> int:
        """The fewest units to drop for the rest to fit (dropping more never adds tokens, so a
        binary search); ``ContextOverflow`` when even dropping all of them is not enough."""
        lo, hi = 1, len(self.droppable)
        if not self.droppable or self.count(self.without(hi)) > budget:
            raise _overflow(
                self.count(self.without(len(self.droppable))),
                self.request,
                self.window,
                self.model,
                f"it does not fit even with only the protected messages (system, first user, latest) "
                f"kept, after dropping all {sum(map(len, self.droppable))} others; shorten the input",
            )
        while lo < hi:
            mid = (lo + hi) // 2
            if self.count(self.without(mid)) <= budget:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def fitted(self, k: int, summary: str) -> Fitted:
        req = self.without(k, summary)
        return Fitted(
            req,
            dropped=tuple(self.messages[i] for u in self.droppable[:k] for i in u),
            summary=summary,
            prompt_tokens=self.count(req),
            original_messages=len(self.messages),
            dropped_tokens=self.prompt - self.count(self.without(k)),
            window=self.window,
            model=self.model,
        )

    async def summarised(self, k: int, budget: int, summarise: Summariser) -> Fitted:
        """The dropped turns replaced by a summary, which needs room too: drop more (steps
        doubling, so an LLM summariser is called O(log n) times) until summary and all fit."""
        step, summary = 1, ""
        while True:
            dropped = [self.messages[i] for u in self.droppable[:k] for i in u]
            summary = (await summarise(dropped)).strip()
            if self.count(self.without(k, summary)) <= budget:
                return self.fitted(k, summary)
            if k == len(self.droppable):
                break
            k = min(len(self.droppable), k + step)
            step *= 2
        # Everything droppable is gone and the summary still does not fit: keep its longest
        # prefix that does (we know the request fits with no summary at all).
        lo, hi = 0, len(summary)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.count(self.without(k, summary[:mid].rstrip() + "…")) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return self.fitted(k, summary[:lo].rstrip() + "…" if lo else "")


def clip(text: str, limit: int, ref: str) -> str:
    """``text`` if it has at most ``limit`` characters, else its head and a short tail around
    a marker saying how much was cut and where the full output is (``ref``).

    The model sees ``limit`` characters of the output plus the marker, and knows it is not
    seeing everything (and where to look), instead of silently reasoning over a fragment.
    """
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if len(text) <= limit:
        return text
    tail = min(limit // 5, 1_000)
    head = limit - tail
    marker = f"\n…[clipped: showing {limit:,} of {len(text):,} characters; full output: {ref}]…\n"
    return text[:head] + marker + (text[-tail:] if tail else "")


def passages(hits: Sequence[dict[str, object]]) -> str:
    """Retrieved passages as a model reads them best: ``[doc#chunk] text``, a paragraph each (the
    text on one line), in rank order; the reference is the one a citation must use."""
    return "\n\n".join(f"[{h['doc_id']}#{h['chunk_id']}] {' '.join(str(h['text']).split())}" for h in hits)


def search_hits(text: str) -> list[dict[str, object]] | None:
    """A ``search_docs`` answer read back: its hits (``doc_id``, ``chunk_id``, ``text`` each), or
    None when the text is not such a list (the call failed, timed out, or is another tool's)."""
    try:
        hits = json.loads(text)
    except ValueError:
        return None
    if isinstance(hits, list) and all(isinstance(h, dict) and {"doc_id", "chunk_id", "text"} <= h.keys() for h in hits):
        return hits
    return None


def parse_passages(text: str) -> list[dict[str, str]]:
    """``passages`` read back: ``{"doc_id", "chunk_id", "text"}`` per paragraph that has the form."""
    found = []
    for para in text.split("\n\n"):
        if m := _PASSAGE.match(para.strip()):
            found.append({"doc_id": m.group(1), "chunk_id": m.group(2), "text": m.group(3)})
    return found


def as_searched(request: ModelRequest, unwrap: Callable[[str], str]) -> ModelRequest:
    """For a model that reads passages only as a search's result (the scripted one): the worker's
    passages message (``GROUNDING_LABEL``) becomes a ``search_docs`` call and its result, the hits
    as JSON. ``unwrap`` takes the untrusted block's delimiters off."""
    msgs = request.messages
    at = next((i for i, m in enumerate(msgs) if m.role == "user" and m.content.startswith(GROUNDING_LABEL)), -1)
    if at < 0:
        return request
    body = msgs[at].content.removeprefix(GROUNDING_LABEL)
    hits = parse_passages(unwrap(body))
    result = json.dumps(hits) if hits or "(no passage matched)" in body else unwrap(body)
    call = ToolCall("grounding", "search_docs", {})
    searched = (Message("assistant", "", (call,)), Message("tool", result, tool_call_id=call.id, name="search_docs"))
    return replace(request, messages=msgs[:at] + searched + msgs[at + 1 :])
