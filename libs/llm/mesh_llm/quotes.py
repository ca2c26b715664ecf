"""Quoted answers: a model too small to write a grounded answer chooses one instead.

A step whose context holds cited text (the passages it retrieved, ``[doc#chunk] text``, or an
earlier step's answer whose sentences carry ``[doc#chunk]`` after them) can be answered by
*choosing* sentences of that text: the request's ``response_schema`` admits only
``{"quotes": [...]}`` with each item one of those sentences, verbatim, so a model held to the
schema (llama.cpp's grammar, a provider's structured output) cannot write a word the documents
do not say. The model still decides what answers the instruction, and in what order; the worker
then writes the chosen sentences out, each with the reference of the passage it came from.

It is a mode for small local models (``MESH_ANSWER_STYLE=quoted``): a quoted answer is
grounded and cited by construction, and reads like a list of extracts, not prose.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh_llm.context import GROUNDING_LABEL, INPUT_LABEL, parse_passages, search_hits
from mesh_llm.model import Message

MAX_CANDIDATES = 24
"""At most this many sentences are offered (in the order they were read): the grammar grows with them."""
MAX_QUOTES = 3
"""At most this many are chosen: an answer, not the passages again."""
MIN_WORDS = 5
"""A shorter fragment ("See below.") is not worth offering."""

_REF = re.compile(r"\[([^\[\]#\s]+#[^\[\]\s]+)\]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")
_BLOCK = re.compile(r"^<<untrusted[^\n]*>>\n(.*)\n<<end untrusted[^\n]*>>\s*$", re.S)
_INPUT = re.compile("^" + re.escape(INPUT_LABEL).replace(re.escape("{step}"), r"[^\s:]+"))


@dataclass(frozen=True)
class Quote:
    """One sentence that may be quoted, verbatim, and the ``doc#chunk`` it came from."""

    text: str
    ref: str


def _data(m: Message) -> str | None:
    """What a context message holds as data, without the worker's label and delimiters: a tool's
    result, the passages retrieved for the step, an earlier step's output; None for anything
    else (the instruction, the checker's feedback, the model's own turns)."""
    if m.role == "tool":
        text = m.content
    elif m.role == "user" and m.content.startswith(GROUNDING_LABEL):
        text = m.content.removeprefix(GROUNDING_LABEL)
    elif m.role == "user" and (label := _INPUT.match(m.content)):
        text = m.content[label.end() :]
    else:
        return None
    block = _BLOCK.match(text.strip())
    return block.group(1) if block else text


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(" ".join(text.split())) if s.strip()]


def _from_text(body: str) -> Iterable[Quote]:
    """Passages (``[doc#chunk] text`` paragraphs, or a search's hits as JSON): every sentence of
    ``MIN_WORDS`` or more (a heading is not an answer), with its passage's reference. Any other
    text (an earlier step's answer): every sentence, with the reference written after it
    ("Claim. [d#1]", as the checker reads it), or none (a computed result, "17 * 23 = 391.")."""
    hits = search_hits(body)
    found = [(str(h["text"]), f"{h['doc_id']}#{h['chunk_id']}") for h in (hits or parse_passages(body))]
    if found:
        for text, ref in found:
            yield from (Quote(s, ref) for s in _sentences(text) if len(s.split()) >= MIN_WORDS)
        return
    pieces = _REF.split(" ".join(body.split()))
    for i in range(0, len(pieces), 2):
        said = _sentences(pieces[i])
        ref = pieces[i + 1] if i + 1 < len(pieces) else ""
        yield from (Quote(s, "") for s in said[:-1] if ref)
        if said:
            yield Quote(said[-1], ref)
        yield from (Quote(s, "") for s in said[:-1] if not ref)


def candidates(messages: Sequence[Message]) -> list[Quote]:
    """The sentences a quoted answer may use, each once, in the order read: those of the passages
    the step retrieved and those of its inputs (earlier steps' answers), not its instruction;
    none when no sentence carries a reference (there is nothing cited to answer from)."""
    seen: dict[str, Quote] = {}
    for m in messages:
        if (data := _data(m)) is not None:
            for q in _from_text(data):
                if q.text not in seen and len(seen) < MAX_CANDIDATES:
                    seen[q.text] = q
    return list(seen.values()) if any(q.ref for q in seen.values()) else []


def schema(quotes: Sequence[Quote]) -> dict[str, object]:
    """The answer's JSON Schema: one to ``MAX_QUOTES`` of the sentences, verbatim."""
    return {
        "type": "object",
        "properties": {
            "quotes": {
                "type": "array",
                "items": {"type": "string", "enum": [q.text for q in quotes]},
                "minItems": 1,
                "maxItems": MAX_QUOTES,
            }
        },
        "required": ["quotes"],
        "additionalProperties": False,
    }


def options_of(response_schema: dict[str, object] | None) -> list[str]:
    """The sentences ``response_schema`` lets an answer quote, or [] when it is not ``schema``'s."""
    try:
        enum = response_schema["properties"]["quotes"]["items"]["enum"]  # type: ignore[index]
    except (KeyError, TypeError):
        return []
    return [str(x) for x in enum] if isinstance(enum, list) else []


def compose(content: str, quotes: Sequence[Quote]) -> str | None:
    """The chosen sentences written out, each followed by its reference (if it has one), each
    once, in the order chosen; None when ``content`` chose nothing this list offers (a model not held to
    the schema answered something else: the caller keeps what it wrote)."""
    try:
        chosen = json.loads(content)["quotes"]
    except (ValueError, KeyError, TypeError):
        return None
    by_text = {q.text: q for q in quotes}
    out: list[str] = []
    for text in chosen if isinstance(chosen, list) else ():
        q = by_text.get(text) if isinstance(text, str) else None
        said = f"{q.text} [{q.ref}]" if q is not None and q.ref else q.text if q is not None else ""
        if said and said not in out:
            out.append(said)
    return " ".join(out) or None


class QuoteStream:
    """What a watching client sees of a quoted answer while it streams: the quoted sentences as
    they are written, not the JSON around them. ``feed`` takes a delta of the model's text and
    returns the part of it to show."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget what was fed: a retried or fallen-back call's text starts its JSON afresh."""
        self._depth = 0  # inside the quotes array
        self._in_string = False
        self._escaped = False
        self._hex: str | None = None  # the digits of a \\u escape, as they come

    def feed(self, delta: str) -> str:
        out: list[str] = []
        for ch in delta:
            if self._hex is not None:
                self._hex += ch
                if len(self._hex) == 4:
                    code = int(self._hex, 16) if re.fullmatch(r"[0-9a-fA-F]{4}", self._hex) else 0xD800
                    if self._depth and not 0xD800 <= code <= 0xDFFF:  # half a pair is not shown
                        out.append(chr(code))
                    self._hex = None
            elif self._in_string:
                if self._escaped:
                    self._escaped = False
                    if ch == "u":
                        self._hex = ""
                    elif self._depth:
                        out.append({"n": " ", "t": " "}.get(ch, ch))
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
                    if self._depth:
                        out.append(" ")
                elif self._depth:
                    out.append(ch)
            elif ch == '"':
                self._in_string = True
            elif ch == "[":
                self._depth += 1
            elif ch == "]":
                self._depth = max(0, self._depth - 1)
        return "".join(out)
