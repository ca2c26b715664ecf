"""Constrained output for small models: the plan schema the planner sends, how the OpenAI-compatible
provider carries a schema, and the local model server's tool-call format (the parts of
``infra/local-model/structured.py`` that need no llama.cpp: its grammars are exercised by ``make
demo-local`` and ``bench_models.py``, which build it)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jsonschema
import pytest

from mesh_contracts.v1.records import ToolCatalogue
from mesh_llm.model import Message, ModelRequest
from mesh_llm.openai import OpenAIChat
from mesh_planner.drafts import SCHEMA_MAX_STEPS, checked_plan, plan_schema
from mesh_testing.scripts import load_script
from mesh_tool_executor.tools import Registry

pytestmark = pytest.mark.unit
serve = load_script(Path(__file__).resolve().parents[2] / "infra" / "local-model" / "structured.py")


def _catalogue() -> ToolCatalogue:
    return Registry().catalogue()


def _plans(n_max: int):
    """Every plan shape up to ``n_max`` steps: each step depending on any subset of the earlier ones."""
    for n in range(1, n_max + 1):
        subsets = [
            [list(c) for r in range(i) for c in itertools.combinations([f"s{j}" for j in range(1, i)], r)]
            for i in range(1, n + 1)
        ]
        for deps in itertools.islice(itertools.product(*subsets), 50):
            yield [
                {
                    "step_id": f"s{i + 1}",
                    "kind": "research",
                    "instruction": "x",
                    "tools": ["search_docs"],
                    "depends_on": d,
                }
                for i, d in enumerate(deps)
            ]


def test_every_plan_the_schema_admits_is_one_the_planner_runs():
    schema = plan_schema(_catalogue(), 4)
    jsonschema.Draft202012Validator.check_schema(schema)
    admitted = 0
    for steps in _plans(4):
        jsonschema.validate({"steps": steps}, schema)  # the schema admits every well-formed plan shape
        assert len(checked_plan(steps, 4)) == len(steps)  # and the planner accepts each of them
        admitted += 1
    assert admitted > 50


@pytest.mark.parametrize(
    "steps",
    [
        [{"step_id": "s1", "kind": "research", "instruction": "x", "tools": [], "depends_on": ["s1"]}],  # itself
        [{"step_id": "s2", "kind": "research", "instruction": "x", "tools": [], "depends_on": []}],  # not s1
        [
            {"step_id": "s1", "kind": "research", "instruction": "x", "tools": ["rm_rf"], "depends_on": []}
        ],  # no such tool
        [
            {"step_id": f"s{i}", "kind": "answer", "instruction": "x", "tools": [], "depends_on": []}
            for i in range(1, 6)
        ],
        [{"step_id": "s1", "kind": "research", "instruction": "x", "tools": [], "depends_on": [], "extra": 1}],
    ],
    ids=["self-dependency", "wrong-id", "unknown-tool", "too-many-steps", "unknown-field"],
)
def test_the_schema_refuses_what_the_planner_would_refuse(steps):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"steps": steps}, plan_schema(_catalogue(), 4))


def test_the_schema_names_the_catalogue_and_stops_growing_at_its_cap():
    schema = plan_schema(_catalogue(), 50)
    shapes = schema["properties"]["steps"]["anyOf"]
    assert len(shapes) == SCHEMA_MAX_STEPS
    tools = set(shapes[0]["prefixItems"][0]["properties"]["tools"]["items"]["enum"])
    assert {"search_docs", "calculator", "text_stats"} <= tools


def test_an_openai_compatible_request_carries_the_schema_and_only_when_there_is_one():
    chat = OpenAIChat("m", base_url="http://127.0.0.1:1/v1")
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = chat.payload(ModelRequest((Message("user", "hi"),), agent="planner", response_schema=schema), stream=False)
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "planner_output", "schema": schema},
    }
    assert "response_format" not in chat.payload(ModelRequest((Message("user", "hi"),)), stream=False)
    # the response cache's key changes with the schema, and a request without one keys as before
    plain = ModelRequest((Message("user", "hi"),))
    assert "response_schema" not in plain.fingerprint()
    assert ModelRequest((Message("user", "hi"),), response_schema=schema).fingerprint() != plain.fingerprint()


# --- the local model server's tool-call format -------------------------------------------------------


def test_a_tool_call_the_model_writes_comes_back_in_the_api_shape():
    call = serve.tool_call('<tool_call>{"name": "calculator", "arguments": {"expression": "2+2"}}</tool_call>')
    assert call is not None and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "2+2"}
    for text in ("The answer is 4.", '<tool_call>{"name": 3}</tool_call>', "<tool_call>{not json</tool_call>"):
        assert serve.tool_call(text) is None, text
    # streamed: held while it may still become a call, let go as soon as it cannot
    assert all(serve.may_be_call(t) for t in ("", " ", "<to", "<tool_call>", '<tool_call>{"na'))
    assert not any(serve.may_be_call(t) for t in ("The", "<b>", "<toy"))


def test_tools_and_tool_choice_are_read_as_the_api_defines_them():
    fn = {"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}
    other = {"type": "function", "function": {"name": "other"}}
    assert [t["required"] for t in serve.tools_of({"tools": [fn, other]})] == [False, False]  # auto
    assert serve.tools_of({"tools": [fn], "tool_choice": "none"}) == []
    assert [t["required"] for t in serve.tools_of({"tools": [fn], "tool_choice": "required"})] == [True]
    named = serve.tools_of({"tools": [fn, other], "tool_choice": {"type": "function", "function": {"name": "other"}}})
    assert [(t["name"], t["required"]) for t in named] == [("other", True)]
    for bad, why in [
        ({"tools": [fn], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not in 'tools'"),
        ({"tools": [{"type": "function", "function": {}}]}, "must be a function tool with a name"),
        ({"tools": [fn], "tool_choice": "sometimes"}, "'tool_choice' must be"),
    ]:
        with pytest.raises(serve.BadRequest, match=why):
            serve.tools_of(bad)


def test_length_bounds_too_long_for_a_grammar_are_left_to_the_receiver():
    schema = Registry().catalogue()
    text_stats = next(t.parameters for t in schema.tools if t.name == "text_stats")
    loose = serve._loosen(text_stats)
    assert "maxLength" not in loose["properties"]["text"]  # 100000: n nested rules would crash llama.cpp
    calc = next(t.parameters for t in schema.tools if t.name == "calculator")
    assert serve._loosen(calc)["properties"]["expression"] == {
        "minLength": 1, "type": "string", "pattern": r"^[-+(0-9][0-9.eE_+\-*/%() ]*$"}  # (and no title)  # fmt: skip
    assert serve._loosen({"type": "array", "maxItems": 3})["maxItems"] == 3
    # An argument may be called "title" or "description": only the annotations go, not the names.
    ticket = {"type": "object", "title": "Ticket", "required": ["title", "description"],
              "properties": {"title": {"type": "string", "title": "Title"}, "description": {"type": "string"},
                             "kind": {"enum": [{"title": "kept as data"}]}}}  # fmt: skip
    assert serve._loosen(ticket) == {
        "type": "object",
        "required": ["title", "description"],
        "properties": {"title": {"type": "string"}, "description": {"type": "string"},
                       "kind": {"enum": [{"title": "kept as data"}]}},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("pattern", "spelled"),
    [
        # send_email's `to`: a negated class excludes the quote and the backslash too (a JSON string's ends)
        (r"^[^@\s]+@[^@\s]+\.[^@\s]+$", r'^[^"\\@ \t\n\r]+@[^"\\@ \t\n\r]+[.][^"\\@ \t\n\r]+$'),
        (r"^\d{3}-\w+$", r"^[0-9]{3}-[a-zA-Z0-9_]+$"),
        (r"^a\.b\(c\)\\d$", r"^a[.]b[(]c[)][\\]d$"),  # an escaped literal: a class of one
        (r"^[\]\-\\a]+$", r"^[\]\-\\a]+$"),  # escapes a grammar's class takes as they are
        (r"^https?://", r'^https?://[^"\\]*$'),  # a prefix: the converter wants both anchors
        (r"^[-+(0-9][0-9.eE_+\-*/%() ]*$", r"^[-+(0-9][0-9.eE_+\-*/%() ]*$"),
        (r"a\bc", None),  # an escape a grammar has no spelling for: the pattern is dropped
        ("abc", None),  # a match anywhere: dropped (the tool validates the whole schema anyway)
    ],
)
def test_patterns_are_spelled_in_escapes_a_grammar_parses(pattern, spelled):
    assert serve._pattern(pattern) == spelled
    loose = serve._loosen({"type": "string", "pattern": pattern})
    assert loose == ({"type": "string", "pattern": spelled} if spelled else {"type": "string"})


def test_the_local_server_names_its_models_and_refuses_an_unknown_one_in_one_line(capsys):
    server = load_script(Path(__file__).resolve().parents[2] / "infra" / "local-model" / "serve.py")
    with pytest.raises(SystemExit) as exit_:
        server.main(["--model", "gpt-17"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "smollm2-135m" in err and "gemma3-270m" in err


def test_the_loop_guard_stops_at_the_first_repeated_run_and_never_on_fresh_text():
    window: list[int] = []
    seen: set[tuple[int, ...]] = set()
    loop = [1, 2, 3, 4, 5] * 3  # "a document that is a reference to a document that is ..."
    stops = [i for i, t in enumerate(loop) if serve.looping(4, t, window, seen)]
    assert stops and stops[0] == 8  # tokens 5..8 repeat tokens 0..3: stop there
    window, seen = [], set()
    assert not any(serve.looping(4, t, window, seen) for t in range(1000))  # no run repeats
    assert not any(serve.looping(0, t, [], set()) for t in loop)  # 0: off
