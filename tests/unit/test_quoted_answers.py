"""Quoted answers (``mesh_llm.quotes``, the worker's ``MESH_ANSWER_STYLE=quoted``) and how the local
model server answers a multiple choice (``infra/local-model/choose.py``: the parts that need no
llama.cpp; its scoring runs in ``make test-local-model`` and ``make demo-local``)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import jsonschema
import pytest

from mesh_guardrails.provenance import Text
from mesh_llm import quotes as mq
from mesh_llm.context import GROUNDING_LABEL, INPUT_LABEL, passages
from mesh_llm.model import Message, ModelRequest
from mesh_llm.scripted import ScriptedModel
from mesh_testing.scripts import load_script

pytestmark = pytest.mark.unit
choose = load_script(Path(__file__).resolve().parents[2] / "infra" / "local-model" / "choose.py")

HITS = [
    {
        "doc_id": "durability.md",
        "chunk_id": "0",
        "text": "Durability and exactly-once steps. Duplicate side "
        "effects are avoided in two layers. Every side effect is guarded by an idempotency ledger.",
    },
    {"doc_id": "budget.md", "chunk_id": "1", "text": "A denied reservation means the call is not made."},
]


def _grounded(instruction: str, *inputs: tuple[str, str]) -> list[Message]:
    """A step's context as the worker builds it: the instruction, its inputs, its passages (untrusted)."""
    msgs = [Message("system", "You are a worker."), Message("user", instruction)]
    for sid, text in inputs:
        msgs.append(
            Message("user", Text.untrusted(text, f"step:{sid}").labelled(INPUT_LABEL.format(step=sid)).render("k"))
        )
    msgs.append(Message("user", Text.untrusted(passages(HITS), "search_docs:x").labelled(GROUNDING_LABEL).render("k")))
    return msgs


def test_the_options_are_the_passages_sentences_with_their_references_and_no_heading():
    got = mq.candidates(_grounded("How are duplicates avoided?"))
    assert [(q.text, q.ref) for q in got] == [
        ("Duplicate side effects are avoided in two layers.", "durability.md#0"),
        ("Every side effect is guarded by an idempotency ledger.", "durability.md#0"),
        ("A denied reservation means the call is not made.", "budget.md#1"),
    ]  # "Durability and exactly-once steps." is a heading (four words): not an answer


def test_an_earlier_steps_answer_keeps_the_reference_written_after_each_sentence():
    earlier = "Duplicates are dropped by the server. [durability.md#0] 17 * 23 = 391. Ledgers record results. [d#2]"
    got = {q.text: q.ref for q in mq.candidates(_grounded("Answer", ("s1", earlier)))}
    assert got["Duplicates are dropped by the server."] == "durability.md#0"
    assert got["17 * 23 = 391."] == "", "a sentence with no reference after it has none (a computed result)"
    assert got["Ledgers record results."] == "d#2"


def test_the_instruction_and_the_checkers_feedback_are_never_options():
    msgs = _grounded("Say that the ledger was removed last week. [durability.md#0]")
    msgs.append(Message("user", "Feedback from the checker: Duplicate side effects are everywhere. [x#1]"))
    texts = [q.text for q in mq.candidates(msgs)]
    assert len(texts) == 3 and not any("removed" in t or "everywhere" in t for t in texts), texts


def test_nothing_cited_means_no_quoted_answer():
    msgs = [Message("system", "s"), Message("user", "Compute 2 + 2"), Message("user", "Input from s1: 2 + 2 = 4.")]
    assert mq.candidates(msgs) == []


def test_the_schema_admits_only_the_sentences_verbatim_and_compose_cites_each_once():
    quotes = mq.candidates(_grounded("How are duplicates avoided?"))
    schema = mq.schema(quotes)
    ok = {"quotes": [quotes[1].text, quotes[0].text]}
    jsonschema.validate(ok, schema)
    for bad in ({"quotes": []}, {"quotes": ["Duplicate side effects are avoided."]}, {"quotes": [q.text for q in quotes] * 2},
                {"quotes": [quotes[0].text], "more": 1}, {}):  # fmt: skip
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert mq.compose(json.dumps(ok), quotes) == (
        "Every side effect is guarded by an idempotency ledger. [durability.md#0] "
        "Duplicate side effects are avoided in two layers. [durability.md#0]"
    )
    twice = json.dumps({"quotes": [quotes[2].text, quotes[2].text]})
    assert mq.compose(twice, quotes) == "A denied reservation means the call is not made. [budget.md#1]"
    assert mq.compose("Duplicates are avoided.", quotes) is None, (
        "an answer that is not the schema's is kept as written"
    )
    assert mq.compose(json.dumps({"quotes": ["invented"]}), quotes) is None
    assert mq.options_of(schema) == [q.text for q in quotes]
    assert mq.options_of({"type": "object"}) == [] and mq.options_of(None) == []


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 7])
def test_a_client_watching_the_stream_sees_the_sentences_not_the_json(cut):
    text = json.dumps({"quotes": ['He said "go" \u2014 then left.', "Second one.\nEnd."]})  # escapes: \" \u2014 \n
    shown = mq.QuoteStream()
    out = "".join(shown.feed(text[i : i + cut]) for i in range(0, len(text), cut))
    assert out == 'He said "go" \u2014 then left. Second one. End. '


def test_a_stream_cut_mid_sentence_and_retried_shows_only_the_retrys_sentences():
    shown = mq.QuoteStream()
    first = shown.feed('{"quotes": ["Half a sent')  # the provider failed here; a fallback starts over
    shown.reset()
    again = shown.feed('{"quotes": ["Whole one."]}')
    assert (first, again) == ("Half a sent", "Whole one. ")


def test_the_scripted_model_covers_the_instruction_a_sentence_at_a_time():
    context = _grounded("How are duplicate side effects avoided? Also compute 17 * 23.", ("s2", "17 * 23 = 391. [c#1]"))
    request = ModelRequest(tuple(context), response_schema=mq.schema(mq.candidates(context)), agent="worker")
    reply = asyncio.run(ScriptedModel().complete(request))
    chosen = json.loads(reply.content)["quotes"]
    assert chosen[0] == "Duplicate side effects are avoided in two layers.", "the most of the question first"
    assert "17 * 23 = 391." in chosen, "then what covers the rest of it"
    assert len(chosen) <= mq.MAX_QUOTES


# --- the local server's multiple choice (choose.py) ---------------------------------------------


def test_the_server_recognises_a_multiple_choice_and_nothing_else():
    quotes = mq.candidates(_grounded("q"))
    pick = choose.choice(mq.schema(quotes))
    assert pick is not None and pick.key == "quotes" and pick.options == tuple(q.text for q in quotes)
    assert (pick.least, pick.most) == (1, 3)
    assert json.loads(pick.answer([quotes[0].text])) == {"quotes": [quotes[0].text]}
    for other in (
        {
            "type": "object",
            "properties": {"steps": {"type": "array", "items": {"type": "object"}}},
            "required": ["steps"],
        },
        {"type": "object", "properties": {"a": {"type": "array", "items": {"enum": ["x"]}}}},  # not required
        {"type": "object", "properties": {"a": {"type": "array", "items": {"enum": [1, 2]}}}, "required": ["a"]},
        {"type": "array", "items": {"enum": ["x"]}},
        None,
    ):
        assert choose.choice(other) is None, other


def test_the_question_is_what_the_options_did_not_come_from():
    options = ("Duplicate side effects are avoided in two layers.",)
    chat = [
        {"role": "system", "content": "You are a worker."},
        {"role": "user", "content": "How are duplicates avoided?"},
        {"role": "user", "content": "Passages: [d#0] Duplicate side effects are avoided in two layers."},
    ]
    assert choose.question(chat, options) == [chat[1]]
    assert choose.question(chat[2:], options) == [], "no question: the server decodes under the grammar instead"


def test_the_answer_is_what_the_question_raised_at_least_one_at_most_the_schemas():
    pick = choose.Choice("quotes", ("a", "b", "c", "d"), 1, 3)
    assert choose.chosen([(4.0, "c"), (2.0, "a"), (0.5, "d"), (0.1, "b")], pick) == ["c", "a", "d"]
    assert choose.chosen([(1.0, "b"), (-0.2, "a"), (-3.0, "c"), (-4.0, "d")], pick) == ["b"]
    assert choose.chosen([(-1.0, "d"), (-2.0, "a"), (-3.0, "b"), (-4.0, "c")], pick) == ["d"], "one at least"
    assert choose.chosen([(-1.0, "d"), (-2.0, "a")], choose.Choice("quotes", ("a", "d"), 2, 2)) == ["d", "a"]
