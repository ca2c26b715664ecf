"""What serve.py adds to a small model's output: tool calls and structured output (a small model has
no native tool-call format, so the server gives it one and holds it to it with llama.cpp grammars,
see the comment below), and a guard against loops. Imported by serve.py from this folder; llama_cpp
is imported only where a grammar is built."""

from __future__ import annotations

import json
import uuid
from typing import Any


class BadRequest(Exception):
    """A client error, answered as an OpenAI-style error object."""

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


# --- tool calls and structured output ---------------------------------------------------------------
#
# A small model has no native tool-call format, so this server gives it one and holds it to it: the
# tools are described in the system turn, a call is written as <tool_call>{"name", "arguments"}</tool_call>,
# and a grammar built from the tools' JSON Schemas (llama.cpp's json_schema_to_gbnf) lets the sampler
# produce only a well-formed call to an offered tool with valid arguments, or plain text (tool_choice
# "auto"), or only a call ("required" or a named function). ``response_format`` json_schema / json_object
# becomes a grammar the same way: the answer is valid JSON in that schema, whatever the model's size.

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_PROMPT = (
    "You can call one of these tools. To call a tool, reply with only "
    '<tool_call>{{"name": "<tool name>", "arguments": {{...}}}}</tool_call> and nothing else; '
    "otherwise reply with your answer.\nTools:\n{tools}"
)


def arguments(fn: dict[str, Any]) -> Any:
    raw = fn.get("arguments") or "{}"
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return raw


def written_call(fn: dict[str, Any], *, tagged: bool = True) -> str:
    """A call of the conversation (an API ``function``), as the model is asked to write one; not
    ``tagged`` (a model not told how to call, whose calls are only forced): not at all (the
    result's turn names the tool), so it has no call to copy into its answer (SmolLM2 wrote
    ``<tool_call>...`` after a forced call shown in tags, and "(I called ...)" after one in words)."""
    if not tagged:
        return ""
    return f"{TOOL_OPEN}{json.dumps({'name': fn.get('name'), 'arguments': arguments(fn)})}{TOOL_CLOSE}"


def tools_of(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The function tools the model may call under ``tool_choice`` (none: [])."""
    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be a list", param="tools")
    specs = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"tools[{i}] must be a function tool with a name", param=f"tools[{i}]")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise BadRequest(f"tools[{i}].function.parameters must be a JSON Schema object", param=f"tools[{i}]")
        specs.append({"name": fn["name"], "description": str(fn.get("description") or ""), "parameters": params})
    choice = body.get("tool_choice", "auto")
    if choice == "none" or not specs:
        return []
    if isinstance(choice, dict):
        name = ((choice.get("function") or {}) if isinstance(choice.get("function"), dict) else {}).get("name")
        chosen = [t for t in specs if t["name"] == name]
        if not chosen:
            raise BadRequest(f"tool_choice names {name!r}, which is not in 'tools'", param="tool_choice")
        return [{**chosen[0], "required": True}]
    if choice not in ("auto", "required"):
        raise BadRequest("'tool_choice' must be 'none', 'auto', 'required' or a named function", param="tool_choice")
    return [{**t, "required": choice == "required"} for t in specs]


def tool_prompt(chat: list[dict[str, str]], tools: list[dict[str, Any]]) -> list[dict[str, str]]:
    listed = "\n".join(f"- {t['name']}: {t['description']} Arguments: {json.dumps(t['parameters'])}" for t in tools)
    note = TOOL_PROMPT.format(tools=listed)
    if chat and chat[0]["role"] == "system":
        return [{"role": "system", "content": f"{chat[0]['content']}\n\n{note}"}, *chat[1:]]
    return [{"role": "system", "content": note}, *chat]


GRAMMAR_MAX_REPEAT = 64
"""A schema's length bounds above this are dropped from its grammar: the converter spells a bound of
n as n nested optional rules (text_stats's maxLength 100000 made a grammar that crashed llama.cpp with
SIGSEGV). What receives the output validates it against the whole schema anyway."""


NAMED = ("properties", "patternProperties", "$defs", "definitions")
"""Keywords whose value maps names to schemas: the names are data (a tool may take a ``title``)."""
LITERAL = ("enum", "const", "default", "examples")
"""Keywords whose value is data, not a schema: left as written."""


_ANY = '[^"\\\\]'
"""Any character inside a JSON string: the converter's ``.`` (and a negated class) would let the
string end early at a quote the model writes, and the JSON go on as garbage."""
_CLASSES = {"s": " \\t\\n\\r", "d": "0-9", "w": "a-zA-Z0-9_"}
_SELF_ESCAPED = set(".-/()[]^$*+?{}|")  # escaped to mean themselves
_IN_CLASS = {"-": "\\-", "]": "\\]", "\\": "\\\\", "n": "\\n", "t": "\\t", "r": "\\r"}


def _pattern(pattern: str) -> str | None:
    """``pattern`` in the escapes llama.cpp's grammars take (``\\s`` ``\\d`` ``\\w`` spelled out as
    classes, an escaped literal as a class of one: the converter writes ``\\.`` into a grammar
    string, which does not parse), or None when it uses another escape (the pattern is dropped).
    A grammar that fails to parse crashed llama.cpp with SIGSEGV (send_email's ``[^@\\s]``)."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            if nxt in _CLASSES:
                out.append(_CLASSES[nxt] if in_class else f"[{_CLASSES[nxt]}]")
            elif in_class and (nxt in _IN_CLASS or nxt in _SELF_ESCAPED):
                out.append(_IN_CLASS.get(nxt, nxt))
            elif nxt in _SELF_ESCAPED or nxt in "ntr\\":
                out.append(f"[{_IN_CLASS.get(nxt, nxt)}]")
            else:
                return None
            i += 2
            continue
        if ch == "[" and not in_class and pattern[i + 1 : i + 2] == "^":  # a negated class: not a quote either
            out.append(_ANY[:-1])
            in_class, i = True, i + 2
            continue
        in_class = (in_class and ch != "]") or (ch == "[" and not in_class)
        out.append(_ANY if ch == "." and not in_class else ch)
        i += 1
    spelled = "".join(out)
    if not spelled.startswith("^"):
        return None  # a match anywhere: the converter takes anchored patterns only
    return spelled if spelled.endswith("$") and not spelled.endswith("\\$") else f"{spelled}{_ANY}*$"


def parses(llm: Any, grammar: Any) -> bool:
    """Whether llama.cpp accepts ``grammar`` (a ``LlamaGrammar``): one it cannot parse gives a null
    sampler, which crashes the process at the first token."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"), grammar._root.encode())
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def _loosen(schema: Any) -> Any:
    """``schema`` without annotations (``title``, ``description``), without length bounds over
    ``GRAMMAR_MAX_REPEAT``, and with its patterns in a grammar's escapes (``_pattern``)."""
    if isinstance(schema, list):
        return [_loosen(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        if k in ("title", "description"):
            continue
        if k in NAMED and isinstance(v, dict):
            out[k] = {name: _loosen(sub) for name, sub in v.items()}
        elif k in LITERAL:
            out[k] = v
        else:
            out[k] = _loosen(v)
    if isinstance(out.get("pattern"), str) and (spelled := _pattern(out.pop("pattern"))) is not None:
        out["pattern"] = spelled
    for bound in ("maxLength", "maxItems", "minLength", "minItems"):
        if isinstance(out.get(bound), int) and out[bound] > GRAMMAR_MAX_REPEAT:
            del out[bound]
    return out


def _gbnf(schema: dict[str, Any], root: str) -> str:
    """GBNF for a JSON Schema, its start rule renamed ``root`` (to combine grammars)."""
    from llama_cpp import llama_grammar

    try:
        text = llama_grammar.json_schema_to_gbnf(json.dumps(_loosen(schema)))
    except (AssertionError, ValueError, KeyError, TypeError, NotImplementedError, RecursionError) as exc:
        raise BadRequest(f"schema cannot be turned into a grammar: {exc}"[:300], param="response_format") from None
    return text.replace("root ::=", f"{root} ::=", 1) if root != "root" else text


def grammar(body: dict[str, Any], tools: list[dict[str, Any]]) -> Any:
    """The grammar the answer is held to, or None: a call to an offered tool (or free text when the
    call is optional), or JSON in the requested schema."""
    from llama_cpp import LlamaGrammar

    fmt = body.get("response_format") or {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest("'response_format' must be {type: text | json_object | json_schema}", param="response_format")
    if tools:
        calls = {"anyOf": [{"type": "object", "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                            "required": ["name", "arguments"]} for t in tools]}  # fmt: skip
        text = _gbnf(calls, "call")
        start = f'root ::= "{TOOL_OPEN}" call "{TOOL_CLOSE}"'
        if not all(t["required"] for t in tools):
            start += " | free\nfree ::= [^<] .*"  # an answer: anything that does not begin a call
        return LlamaGrammar.from_string(f"{start}\n{text}", verbose=False)
    if fmt["type"] == "json_object":
        return LlamaGrammar.from_string(_gbnf({"type": "object"}, "root"), verbose=False)
    if fmt["type"] == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise BadRequest("response_format.json_schema.schema must be a JSON Schema object", param="response_format")
        return LlamaGrammar.from_string(_gbnf(schema, "root"), verbose=False)
    return None


def may_be_call(text: str) -> bool:
    """Whether streamed text so far is, or may still become, a call (``<tool_call>...``)."""
    start = text.lstrip()
    return start.startswith(TOOL_OPEN[: len(start)])


def tool_call(text: str) -> dict[str, Any] | None:
    """The call an answer makes (``<tool_call>{...}</tool_call>``) in the API's shape, or None."""
    body = text.strip()
    if not (body.startswith(TOOL_OPEN) and body.endswith(TOOL_CLOSE)):
        return None
    try:
        call = json.loads(body[len(TOOL_OPEN) : -len(TOOL_CLOSE)])
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments") or {})}}  # fmt: skip


def looping(n: int, token: int, window: list[int], seen: set[tuple[int, ...]]) -> bool:
    """Whether ``token`` closes a run of ``n`` tokens the answer already wrote (``window`` and
    ``seen`` carry the state from token to token)."""
    if n <= 0:
        return False
    window.append(token)
    if len(window) > n:
        del window[0]
    if len(window) < n:
        return False
    run = tuple(window)
    if run in seen:
        return True
    seen.add(run)
    return False


def stop_prefix_len(text: str, stop: list[str], hold: int) -> int:
    """Length of the longest tail of ``text`` that begins some stop string."""
    for n in range(min(hold, len(text)), 0, -1):
        tail = text[-n:]
        if any(s.startswith(tail) for s in stop):
            return n
    return 0


def content(value: Any, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: only text is understood
        parts = []
        for part in value:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise BadRequest(f"{where}: only text content parts are supported", param=where)
        return "".join(parts)
    raise BadRequest(f"{where}: content must be a string, a list of text parts or null", param=where)


def chat(messages: list[Any], *, tagged: bool) -> list[dict[str, str]]:
    """The conversation as the chat template takes it: roles checked, content as text, a prior call
    written as the model is asked to write one (``tagged``) and a tool's result as a user turn."""
    chat: list[dict[str, str]] = []
    called: dict[str, str] = {}  # tool call id -> tool name, to say whose result a tool message is
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
        role = m["role"]
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant", "tool"):
            raise BadRequest(f"messages[{i}].role {role!r} is not supported", param=f"messages[{i}].role")
        text = content(m.get("content"), f"messages[{i}].content")
        for call in m.get("tool_calls") or []:  # written the way this server asks the model to call
            fn = (call.get("function") if isinstance(call, dict) else None) or {}
            called[str(call.get("id", ""))] = str(fn.get("name"))
            text += written_call(fn, tagged=tagged)
        if role == "tool":  # small chat templates know no tool role: the result is a user turn that says so
            role, text = "user", f"Result of {called.get(str(m.get('tool_call_id', '')), 'the tool')}:\n{text}"
        chat.append({"role": role, "content": text})
    return chat
