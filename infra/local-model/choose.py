"""Choosing among a schema's options by what the whole option means to the model, not its first token.

A response schema that asks for a list of options (``{"quotes": [...]}``, each item one of an
``enum`` of strings, as the worker's quoted answers send) is a multiple choice. Greedy decoding
under a grammar makes that choice on the first token alone, and a small model then picks by
position or by a common opening word ("The ...") whatever the question: measured on SmolLM2-135M,
the same heading or the same first sentence for every question. Here each option is scored by
the model as a whole instead, with the question and without it (domain-conditional pointwise
mutual information, Holtzman et al. 2021, "Surface Form Competition"):

    score(option) = log P(option | the question) - log P(option | "Answer:")

The second term takes away what makes an option likely whatever was asked (it is short, it is
common, its words are frequent); what is left is how much the question raises it. "The question"
is the conversation's user turns that the options did not come from (the step's instruction, not
the passages that hold the options): with the passages in the context too, every option is
likely because it is there to copy, and that swamps the question (measured: the choice was then
no better than with the passages left out of both, and often worse).

Stdlib and numpy only (numpy comes with llama-cpp-python); ``serve.py`` calls ``answer`` under its
lock. It reads llama-cpp-python's ``_ctx`` and ``_batch`` (the version requirements.txt pins): the
public ``eval`` keeps the logits of a batch's last token only, and a score needs every token's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Choice:
    """A schema that is a multiple choice: ``{key: [options...]}``, ``least`` to ``most`` of them."""

    key: str
    options: tuple[str, ...]
    least: int
    most: int

    def answer(self, chosen: Sequence[str]) -> str:
        return json.dumps({self.key: list(chosen)})


def choice(schema: Any) -> Choice | None:
    """The multiple choice ``schema`` asks for, or None when it is any other schema: an object with
    one required property, an array of strings from an ``enum`` (at least one option)."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return None
    props = schema.get("properties")
    if not isinstance(props, dict) or len(props) != 1:
        return None
    ((key, prop),) = props.items()
    items = prop.get("items") if isinstance(prop, dict) and prop.get("type") == "array" else None
    enum = items.get("enum") if isinstance(items, dict) else None
    if schema.get("required") != [key] or not isinstance(enum, list) or not enum:
        return None
    if not all(isinstance(x, str) and x for x in enum):
        return None
    options = tuple(dict.fromkeys(enum))
    least = max(1, int(prop.get("minItems", 1)))
    most = max(least, min(int(prop.get("maxItems", len(options))), len(options)))
    return Choice(key, options, min(least, len(options)), most)


PREMISE = [{"role": "user", "content": "Answer:"}]
"""The context an option is weighed against: a turn that asks nothing."""


def question(messages: list[dict[str, Any]], options: Sequence[str]) -> list[dict[str, Any]]:
    """The user turns that hold none of the options (the step's instruction, not its passages),
    as one conversation; [] when every user turn holds some (there is no question to weigh)."""

    def holds(m: dict[str, Any]) -> bool:
        text = str(m.get("content") or "")
        return any(o in text for o in options)

    return [m for m in messages if m.get("role") == "user" and not holds(m)]


def logprobs(llm: Any, prefix: list[int], options: list[list[int]]) -> list[float]:
    """log P(option | prefix) for each option's tokens, summed over its tokens: the prefix is
    evaluated once (reusing the KV cache's matching prefix), each option on top of it."""
    cached = 0
    for a, b in zip(llm.input_ids[: llm.n_tokens], prefix[:-1], strict=False):
        if a != b:
            break
        cached += 1
    llm.n_tokens = cached
    if cached < len(prefix) - 1:
        llm.eval(prefix[cached:-1])  # all but the last token: that one opens each option's batch
    base = len(prefix) - 1
    out = []
    for tokens in options:
        batch = [prefix[-1], *tokens]
        llm._ctx.kv_cache_seq_rm(-1, base, -1)  # what the previous option left
        llm._batch.set_batch(batch=batch, n_past=base, logits_all=True)
        llm._ctx.decode(llm._batch)
        rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(batch) * llm.n_vocab(),))
        rows = rows.reshape(len(batch), llm.n_vocab())[:-1].astype(np.float64)
        top = rows.max(axis=1, keepdims=True)
        norm = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
        out.append(float(sum(rows[i, t] - norm[i] for i, t in enumerate(tokens))))
    llm.input_ids[base : base + 1] = prefix[-1:]
    llm.n_tokens = base + 1  # the KV cache holds the prefix (and the last option, removed next time)
    llm._ctx.kv_cache_seq_rm(-1, base + 1, -1)
    return out


def chosen(ranked: list[tuple[float, str]], pick: Choice) -> list[str]:
    """What the answer says: the best options the question raised (score above 0), at least
    ``least`` and at most ``most`` of them, best first."""
    raised = [o for s, o in ranked if s > 0][: pick.most]
    return raised if len(raised) >= pick.least else [o for _, o in ranked[: pick.least]]


def schema_of(body: dict[str, Any]) -> Any:
    """The JSON Schema a chat request's ``response_format`` asks for, or None."""
    fmt = body.get("response_format")
    spec = fmt.get("json_schema") if isinstance(fmt, dict) and fmt.get("type") == "json_schema" else None
    return spec.get("schema") if isinstance(spec, dict) else None


def answer(engine: Any, chat: list[dict[str, Any]], pick: Choice, result: dict[str, Any]) -> str | None:
    """The answer to a multiple choice, as the schema's JSON: every option scored (see the module's
    docstring), ``result`` filled as generation fills it (the tokens scored count as the prompt's);
    None when the conversation has no question apart from the options (the caller decodes under
    the grammar instead)."""
    asked = question(chat, pick.options)
    if not asked:
        return None
    llm = engine.llm
    tokens = [llm.tokenize(o.encode("utf-8"), add_bos=False, special=False) for o in pick.options]
    given_prompt, alone_prompt = engine.prompt(asked), engine.prompt(PREMISE)
    given, alone = logprobs(llm, given_prompt, tokens), logprobs(llm, alone_prompt, tokens)
    ranked = sorted(((g - a, o) for g, a, o in zip(given, alone, pick.options, strict=True)), key=lambda s: -s[0])
    text = pick.answer(chosen(ranked, pick))
    scored = len(given_prompt) + len(alone_prompt) + 2 * sum(len(t) for t in tokens)
    completion = len(llm.tokenize(text.encode("utf-8"), add_bos=False))
    result.update(prompt_tokens=scored, cached_tokens=0, completion_tokens=completion, finish_reason="stop")
    return text
