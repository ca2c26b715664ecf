"""A deterministic scripted model for tests and demos.

It behaves like a small, obedient agent: the planner role returns a JSON plan, the
worker role calls the tools its step offers and then answers from what they returned.
Same input, same output, same token counts: end-to-end tests can assert exact results.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any, NotRequired, TypedDict

from mesh_llm import cues, quotes
from mesh_llm.context import as_searched
from mesh_llm.errors import ProviderError
from mesh_llm.model import Message, ModelRequest, ModelResponse, StreamEvent, ToolCall, count_tokens
from mesh_llm.tokens import count_request

EMAIL = re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]*\w")
RECIPIENT = re.compile(r"\bto\s+([\w.+-]+@[\w-]+\.[\w.-]*\w)")
URL = re.compile(r"https?://[^\s\"'<>]+[^\s\"'<>.,;:!?)]")
NOTE = re.compile(r"\bnote\s+([A-Za-z0-9_-]{1,64})\b")
SETTING = re.compile(r"\bsetting\s+([a-z][a-z0-9_.]{0,63}[a-z0-9])")
ARITHMETIC = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?(?:\s*[-+*/%]\s*\d+(?:\.\d+)?)+)(?!\w|\.\d)")


# Cues: a test (or a demo) writes these into a goal or a step instruction to provoke a failure.
PLAN_CUE = "PLAN:"  # in a goal: the JSON after it is the plan, verbatim
LOOP_CUE = "#loop"  # in a step: call the first offered tool with the same arguments, forever
AWAIT_CUE = re.compile(r"#await:([A-Za-z0-9_-]+)")  # in a step: first wait for that step's output
DOWN_CUE = "#provider-down"  # in a step: every call fails like a provider returning 503
OBEY_CUE = "#obey"  # in a step: follow instructions found in the context (tool results, passages)
# In a step: answer exactly the text after it (a deliberately broken answer for checker tests);
# {cite} becomes the first [doc#chunk] reference in the step's inputs, {inputs} the inputs'
# text without their references. "#say: A || B" says A, and B once the checker's feedback is in
# the conversation (a model told what was wrong fixes it: a workflow's check node, a redo).
SAY_CUE = re.compile(r"#say:\s*(.+)$", re.S)
REVISED = " || "
# In a worker's system prompt (a release's prompt, not a goal): answer every step with an
# off-topic sentence, whatever it asks (a regressive prompt change, for release tests).
CARELESS_CUE = "#careless"
CARELESS_ANSWER = "Bananas are an excellent source of potassium and are botanically berries."
REF = re.compile(r"\s*\[[^\[\]#\s]+#[^\[\]\s]+\]")
# What a gullible model takes for an instruction inside untrusted text: "call <tool> {json args}".
INJECTED_CALL = re.compile(r"\bcall\s+([A-Za-z_][\w-]*)\s*(\{.*?\})", re.I | re.S)


class ScriptedCall(TypedDict):
    """A tool call in a scripted turn."""

    name: str
    arguments: NotRequired[dict[str, Any]]


class ScriptedTurn(TypedDict, total=False):
    """One scripted assistant turn: what it says, the tools it calls, or the failure it plays
    (an HTTP status such as ``"503"`` or ``"429"``)."""

    content: str
    tool_calls: list[ScriptedCall]
    fail: str | int


class ScriptedModel:
    provider = "scripted"
    context_window = 32_768

    def __init__(
        self, model: str = "scripted-1", scripts: dict[str, list[ScriptedTurn]] | None = None, latency_s: float = 0.0
    ) -> None:
        self.model = model
        self.latency_s = latency_s
        """How long each call waits before it answers, like a remote model would (benchmarks of
        scale-out need the wait without the model: ``latency_ms`` of a scripted provider)."""
        self.calls = 0
        self.scripts = scripts or {}
        """Turns chosen per role and step: key ``"<agent>:<step>"``, ``"<agent>"`` or ``"*"`` -> a
        list of turns ``{"content": str, "tool_calls": [{"name", "arguments"}], "fail": "503"}``;
        the turn played is the number of assistant turns already in the conversation, so a
        script replays the same way on any replica after a crash."""

    def count(self, request: ModelRequest) -> int:
        return count_request(self.provider, self.model, request)

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        self._log(request)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        calls: tuple[ToolCall, ...]
        instruction = next((m.content for m in request.messages if m.role == "user"), "")
        scripted = self._scripted(request)
        if scripted is not None:
            return scripted
        if request.agent != "planner" and DOWN_CUE in instruction:
            raise ProviderError(
                "503 Service Unavailable (scripted outage)",
                kind="server_error",
                provider=self.provider,
                model=self.model,
                status=503,
            )
        if request.agent == "planner":
            content, calls = self._plan(request), ()
        elif request.agent == "judge":
            content, calls = _judge(request), ()
        elif options := quotes.options_of(request.response_schema):
            content, calls = _quote(request, options), ()
        else:
            content, calls = self._work(request)
        out_tokens = min(
            request.max_tokens, count_tokens(content) + sum(count_tokens(json.dumps(c.arguments)) + 3 for c in calls)
        )
        return ModelResponse(
            content,
            calls,
            self.count(request),
            out_tokens,
            self.provider,
            self.model,
            "tool_calls" if calls else "stop",
        )

    def _scripted(self, request: ModelRequest) -> ModelResponse | None:
        turns = next(
            (self.scripts[k] for k in (f"{request.agent}:{request.step}", request.agent, "*") if k in self.scripts),
            None,
        )
        if turns is None:
            return None
        turn = turns[min(sum(1 for m in request.messages if m.role == "assistant"), len(turns) - 1)]
        if turn.get("fail"):
            status = int(turn["fail"]) if str(turn["fail"]).isdigit() else 503
            raise ProviderError(
                f"{status} (scripted failure)",
                kind="rate_limited" if status == 429 else "server_error",
                provider=self.provider,
                model=self.model,
                status=status,
            )
        calls = tuple(
            ToolCall(f"c{i}", c["name"], dict(c.get("arguments", {}))) for i, c in enumerate(turn.get("tool_calls", ()))
        )
        content = str(turn.get("content", ""))
        out = min(
            request.max_tokens, count_tokens(content) + sum(count_tokens(json.dumps(c.arguments)) + 3 for c in calls)
        )
        return ModelResponse(
            content, calls, self.count(request), out, self.provider, self.model, "tool_calls" if calls else "stop"
        )

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamEvent]:
        """The same answer as ``complete``, a word at a time."""
        response = await self.complete(request)
        for word in re.findall(r"\S+\s*", response.content):
            yield StreamEvent(text=word)
        yield StreamEvent(response=response)

    @staticmethod
    def _log(request: ModelRequest) -> None:
        """With MESH_SCRIPTED_LOG set, append one line per call: what the model saw, across
        process deaths (the chaos suite checks that recovery repeats no call)."""
        path = os.environ.get("MESH_SCRIPTED_LOG")  # test instrumentation of the test model, not a setting
        if not path:
            return
        seen = "\n".join(f"{m.role}:{m.content}" for m in request.messages)
        line = json.dumps(
            {
                "agent": request.agent,
                "digest": hashlib.sha256(seen.encode()).hexdigest()[:16],
                "first_user": next((m.content for m in request.messages if m.role == "user"), "")[:120],
            }
        )
        with open(path, "a") as f:  # one short write per line: atomic enough across processes
            f.write(line + "\n")

    # --- planner ------------------------------------------------------------------------------

    def _plan(self, request: ModelRequest) -> str:
        goal = _last(request.messages, "user")
        if PLAN_CUE in goal:
            return goal.split(PLAN_CUE, 1)[1].strip()
        recipient = EMAIL.search(goal)
        if recipient:  # "..., and email the answer to ops@acme.test": not part of the question
            goal_q = re.sub(r"[,;]?\s*(and\s+)?(e-?mail|send)\b.*$", "", goal, flags=re.I | re.S).strip() + "."
        else:
            goal_q = goal
        expr = ARITHMETIC.search(goal_q)
        topic = ARITHMETIC.sub("", goal_q).strip(" ?.,;:") or goal_q
        for _ in range(3):  # drop connective words the arithmetic left dangling ("... Also compute")
            topic = re.sub(r"\b(also|and|then|compute|calculate|what is)\s*$", "", topic, flags=re.I).strip(" ?.,;:")
        # Nothing left to look up ("What is 12 * 12?"): no research step, so no passages on nothing.
        steps = [{"step_id": "s1", "kind": "research", "tools": ["search_docs"],
                  "instruction": f"Find what the documentation says about: {topic}"}] if topic else []  # fmt: skip
        if expr:
            steps.append(
                {
                    "step_id": "s2",
                    "kind": "compute",
                    "difficulty": "easy",  # exact arithmetic by a tool: the cheapest model will do
                    "tools": ["calculator"],
                    "instruction": f"Compute {expr.group(1)}",
                }
            )
        # Nothing to compute: no compute step (a question is not padded with a measurement of itself).
        steps.append(
            {
                "step_id": "s3",
                "kind": "answer",
                "tools": [],
                "depends_on": [str(s["step_id"]) for s in steps],
                "instruction": f"Write the final answer to: {goal_q}",
            }
        )
        if recipient:
            steps.append(
                {
                    "step_id": "s4",
                    "kind": "write",
                    "tools": ["send_email"],
                    "depends_on": ["s3"],
                    "instruction": f"Email the answer to {recipient.group(0)}",
                }
            )
        return json.dumps({"steps": steps})

    # --- worker -------------------------------------------------------------------------------

    def _work(self, request: ModelRequest) -> tuple[str, tuple[ToolCall, ...]]:
        # Passages the worker retrieved before this turn read as a search this model made.
        request = as_searched(request, _unwrap)
        # The step's instruction is the first user message; inputs from dependencies follow it.
        instruction = next((m.content for m in request.messages if m.role == "user"), "")
        results = [m for m in request.messages if m.role == "tool"]
        tools = {t.name for t in request.tools}
        system = next((m.content for m in request.messages if m.role == "system"), "")
        if CARELESS_CUE in system:
            return CARELESS_ANSWER, ()
        if LOOP_CUE in instruction and request.tools:  # stuck: the same call, whatever came back
            first = request.tools[0].name
            return "", (ToolCall("c0", first, {"expression": "1 + 1"} if first == "calculator" else {"text": "x"}),)
        made = [c for m in request.messages if m.role == "assistant" for c in m.tool_calls]
        if (say := SAY_CUE.search(instruction)) and not request.tools:
            inputs = (
                _compose(request.messages) if any(m.content.startswith("Input from ") for m in request.messages) else ""
            )
            cite = REF.search(inputs)
            said = say.group(1).strip()
            if REVISED in said:
                told = any(m.role == "user" and "Feedback from the checker: " in m.content for m in request.messages)
                said = said.split(REVISED, 1)[1 if told else 0].strip()
            text = said.replace("{cite}", cite.group(0).strip() if cite else "")
            return text.replace("{inputs}", REF.sub("", inputs).strip()), ()
        if OBEY_CUE in instruction or (cued := cues.calls(instruction)):
            # Told to obey: every instruction found in what it has read (tool results, passages, inputs), once
            # each, exactly what a guardrail must stop. It does not check that the tool is offered, and it reads
            # through delimiters, fake system messages, passages split across chunks and base64. (Cued: the calls.)
            done = {(c.name, json.dumps(c.arguments, sort_keys=True)) for c in made}
            for name, args in cued if OBEY_CUE not in instruction else _injected(request.messages):
                if (name, json.dumps(args, sort_keys=True)) not in done:
                    return "", (ToolCall("c0", name, args),)
            if OBEY_CUE not in instruction:
                return f"Done: {_unwrap(results[-1].content if results else '')[:500]}", ()
        awaited = AWAIT_CUE.search(instruction)
        if awaited and "await_step" in tools and not results:
            return "", (ToolCall("c0", "await_step", {"step_id": awaited.group(1)}),)
        call = _next_call(instruction, tools, request.messages, made)
        if call is not None:
            return "", (call,)
        if results:
            # Answer from what the step read, not from the receipt of an email it sent.
            informative = [
                r for r in results if r.name != "send_email" and not _unwrap(r.content).startswith("error")
            ] or results
            return _answer_from(informative[-1], instruction), ()
        return _compose(request.messages), ()


def _last(messages: tuple[Message, ...], role: str) -> str:
    return next((m.content for m in reversed(messages) if m.role == role), "")


UNTRUSTED_BLOCK = re.compile(r"^<<untrusted[^\n]*>>\n?|\n?<<end untrusted[^\n]*>>\s*$")
BASE64_RUN = re.compile(r"[A-Za-z0-9+/=_-]{24,}")


def _unwrap(content: str) -> str:
    """The content of a delimited untrusted block (the delimiters are for the model to see,
    not part of the data)."""
    return UNTRUSTED_BLOCK.sub("", content.strip())


def _readable(messages: tuple[Message, ...]) -> list[str]:
    """Everything untrusted the model has read, as it would read it: tool results (the text
    of each retrieved passage), and the inputs from other steps."""
    texts: list[str] = []
    for m in messages:
        if m.role == "tool":
            body = _unwrap(m.content)
            try:
                hits = json.loads(body)
            except json.JSONDecodeError:
                hits = None
            if isinstance(hits, list) and all(isinstance(h, dict) and "text" in h for h in hits):
                passages = [str(h["text"]) for h in hits]
                texts += passages
                # An instruction split across two passages: a gullible reader joins them in any order.
                texts += [f"{a} {b}" for i, a in enumerate(passages) for j, b in enumerate(passages) if i != j]
            else:
                texts.append(body)
        elif m.role == "user" and m.content.startswith(("Input from ", "Feedback from the checker: ")):
            texts.append(_unwrap(m.content.split(":", 1)[1].strip()))
    decoded = []
    for t in texts:
        for run in BASE64_RUN.findall(t):
            try:
                plain = base64.b64decode(
                    run + "=" * (-len(run) % 4), altchars=b"-_" if "-" in run or "_" in run else None
                )
                text = plain.decode()
            except (ValueError, UnicodeDecodeError):
                continue
            if text.isprintable():
                decoded.append(text)
    return texts + decoded


INVISIBLE = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
# Letters a reader takes for Latin ones: an instruction spelled with them reads the same.
LOOKALIKES = str.maketrans("\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0456\u03bf\u03b1\u0455",
                           "aeopcyxioas")  # fmt: skip


def _injected(messages: tuple[Message, ...]) -> list[tuple[str, dict[str, Any]]]:
    """Every "call <tool> {json}" the model has read, in reading order, without repeats. It reads
    the way a person (or a tokenizer-blind model) would: invisible characters are not seen and a
    tool name in look-alike letters is the tool's name; the arguments it copies as written."""
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for text in _readable(messages):
        for m in INJECTED_CALL.finditer(INVISIBLE.sub("", text.translate(LOOKALIKES))):
            start = m.start(2)
            try:  # the arguments as the attacker wrote them (a look-alike address stays one)
                args = json.loads(INVISIBLE.sub("", text)[start : start + len(m.group(2))])
            except json.JSONDecodeError:
                continue
            if isinstance(args, dict):
                found.setdefault(m.group(1) + json.dumps(args, sort_keys=True), (m.group(1), args))
    return list(found.values())


def _next_call(
    instruction: str, tools: set[str], messages: tuple[Message, ...], calls: list[ToolCall]
) -> ToolCall | None:
    """The step's own next tool call: search first, then the email the instruction asks for (its
    body is what the search found, or the inputs), then arithmetic or text statistics. A call
    someone else's text made (an email to another address) does not count as the step's own."""
    body = instruction.split(":", 1)[-1].strip()
    made = {c.name for c in calls if c.name != "send_email"}
    # The step's own emails: a call someone else's text asked for (even to the same address) is not one.
    planted = {json.dumps(args, sort_keys=True) for name, args in _injected(messages) if name == "send_email"}
    mailed = {
        str(c.arguments.get("to", ""))
        for c in calls
        if c.name == "send_email" and json.dumps(c.arguments, sort_keys=True) not in planted
    }
    searched = [m for m in messages if m.role == "tool" and m.name == "search_docs"]
    if "search_docs" in tools and "search_docs" not in made:
        return ToolCall("c0", "search_docs", {"query": body, "top_k": 3})
    read = [m for m in messages if m.role == "tool" and (m.name in ("http_get", "note_read")
                                                         or (m.name or "").endswith("get_setting"))]  # fmt: skip
    if "http_get" in tools and "http_get" not in made and (url := URL.search(instruction)):
        return ToolCall("c0", "http_get", {"url": url.group(0)})
    if "note_read" in tools and "note_read" not in made and (n := NOTE.search(instruction)):
        return ToolCall("c0", "note_read", {"note_id": n.group(1)})
    if "note_list" in tools and "note_list" not in made and "list notes" in instruction.lower():
        return ToolCall("c0", "note_list", {})
    getter = next((t for t in sorted(tools) if t.endswith("get_setting")), None)
    if getter and getter not in made and (key := SETTING.search(instruction)):
        return ToolCall("c0", getter, {"key": key.group(1)})
    # The recipient is the address the instruction sends to ("... to ops@x"), else the first it names.
    to = RECIPIENT.search(instruction) or EMAIL.search(instruction)
    if "send_email" in tools and to and to.group(to.lastindex or 0) not in mailed:
        if searched:
            text = _answer_from(searched[-1], instruction)
        elif read:
            text = _relevant(_unwrap(read[-1].content), _topic(instruction))[:2000]
        else:
            text = "\n\n".join(
                m.content.split(":", 1)[1].strip() for m in messages if m.content.startswith("Input from ")
            )
        return ToolCall("c0", "send_email", {"to": to.group(to.lastindex or 0), "subject": "Your AgentMesh answer",
                                             "body": _unwrap(text) or "(no answer)"})  # fmt: skip
    if calls:
        return None
    if "calculator" in tools and (m := ARITHMETIC.search(instruction)):
        return ToolCall("c0", "calculator", {"expression": m.group(1)})
    if "text_stats" in tools:
        return ToolCall("c0", "text_stats", {"text": body})
    return None


WORD = re.compile(r"[a-z0-9]+")


def _answer_from(result: Message, instruction: str) -> str:
    if result.name == "search_docs":
        try:
            hits = json.loads(_unwrap(result.content))
        except json.JSONDecodeError:
            return f"The search failed: {result.content}"
        if not hits:
            return "The documentation has nothing on this."
        return _extract(hits, _topic(instruction))
    if result.name == "calculator":
        return f"The result is {result.content}." if not result.content.startswith("error") else result.content
    body = _unwrap(result.content)
    if result.name == "http_get" and not body.startswith("error"):
        body = body.split("\n\n", 1)[-1]  # the page, without the status line
    return f"{result.name}: {_relevant(body, _topic(instruction))}"


SEND_CLAUSE = re.compile(r"[,;]?\s*(and\s+)?(e-?mail|send)\b.*$", re.I | re.S)


def _topic(instruction: str) -> str:
    """What a step asks about: its instruction after a colon, without an "and email it to ..." tail
    (the recipient is where the answer goes, not what it is about)."""
    about = instruction.split(":", 1)[-1]
    return SEND_CLAUSE.sub("", about).strip() or about


def _content_stems(text: str) -> set[str]:
    return {w.rstrip("s") for w in WORD.findall(text.lower()) if len(w) > 3}


def _relevant(text: str, query: str, n: int = 3) -> str:
    """A page or a note summarised: its sentences that share a word with the query, in reading
    order (at most ``n``); the whole text when none does."""
    wanted = _content_stems(query)
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", text.strip()) if x]
    kept = [x for x in sentences if wanted & _content_stems(x)][:n]
    return " ".join(kept) if kept else text


def _extract(hits: list[dict[str, Any]], query: str, n: int = 2) -> str:
    """Extractive answer: the ``n`` sentences sharing most words with the query, each cited; a
    sentence that shares none (an aside, an instruction to "the assistant") is left out while
    any sentence does share one."""
    wanted = _content_stems(query)
    scored, seen = [], set()
    for rank, hit in enumerate(hits):
        for pos, sentence in enumerate(re.split(r"(?<=[.!?])\s+", hit["text"].strip())):
            if sentence in seen:  # chunks overlap by a sentence
                continue
            seen.add(sentence)
            overlap = len(wanted & _content_stems(sentence))
            scored.append((-overlap, rank, pos, sentence, f"[{hit['doc_id']}#{hit['chunk_id']}]"))
    if any(s[0] < 0 for s in scored):
        scored = [s for s in scored if s[0] < 0]
    best = sorted(scored)[:n]
    best.sort(key=lambda x: (x[1], x[2]))  # keep reading order
    return " ".join(f"{sentence} {ref}" for _, _, _, sentence, ref in best)


def _compose(messages: tuple[Message, ...]) -> str:
    """Answer step: stitch the inputs (prior step outputs) into one answer."""
    # The checker's feedback on a rejected answer is advice, not material for the answer.
    inputs = [
        m.content
        for m in messages
        if m.role == "user" and m.content.startswith("Input from ") and not m.content.startswith("Input from checker:")
    ]
    parts = [_unwrap(i.split(":", 1)[1].strip()) for i in inputs]  # the data, not its delimiters
    # A measurement of the question itself ("Measure the question") informs, it does not answer.
    answers = [p for p in parts if not p.startswith("text_stats:")]
    parts = answers or parts
    return " ".join(parts) if parts else _last(messages, "user")


# --- judge ----------------------------------------------------------------------------------

STOP = frozenset(
    "about also and answer are been but can does document documentation each for from has have how into "
    "its more not says than that the their them then there these they this what when where which while "
    "who why will with would your".split()
)
REFERENCE = re.compile(r"\[[^\[\]#]+#[^\[\]]+\]")
QUOTED = re.compile(r"[\"\u201c]([^\"\u201d]{2,80})[\"\u201d]")
SEND = re.compile(r"\b(e-?mail|send)\b.*@", re.I | re.S)
MUST_NOT = re.compile(r"\b(must not|should not|does not|doesn't|do not|never|no mention|avoid)\b")
NO_ANSWER = re.compile(
    r"\b(nothing on this|does not (say|mention|cover)|no information|cannot find|don't know)\b", re.I
)


def _stems(text: str) -> set[str]:
    return {w.rstrip("s") for w in WORD.findall(text.lower()) if len(w) > 2 and w not in STOP}


def _quote(request: ModelRequest, options: list[str]) -> str:
    """A quoted answer (``mesh_llm.quotes``): the sentences that cover the step's instruction, one
    at a time the one that adds most of its words not yet covered (a sentence with a number covers
    a computation), up to the schema's three; at least one."""

    def words(text: str) -> set[str]:  # a computation is answered by a number (as the judge reads it)
        return _stems(text) | ({"#number"} if ARITHMETIC.search(text) or re.search(r"\d", text) else set())

    wanted = words(next((m.content for m in request.messages if m.role == "user"), ""))
    chosen: list[str] = []
    while len(chosen) < quotes.MAX_QUOTES:
        gains = [(len(words(o) & wanted), -i, o) for i, o in enumerate(options) if o not in chosen]
        gain, _, best = max(gains, default=(0, 0, ""))  # ties: the option read first
        if not gain:
            break
        chosen.append(best)
        wanted -= words(best)
    return json.dumps({"quotes": chosen or options[:1]})


def _judge(request: ModelRequest) -> str:
    """A deterministic reviewer of the default rubric's four points, lexically: relevant (each
    part of the goal shares words with the answer), grounded (every sentence of three or more
    content words is supported by the passages), complete (no part of the goal left without an
    answer, no answer too thin to say anything), honest (a "no answer" only when the passages
    lack it), plus the rubric's quoted must / must-not phrases. Crude next to a real model,
    which is what calibration is there to show."""
    system = next((m.content for m in request.messages if m.role == "system"), "")
    rubric = system.split("rubric:", 1)[-1].split("Reply with JSON", 1)[0]
    try:
        case = json.loads(_last(request.messages, "user"))
    except json.JSONDecodeError:
        return json.dumps({"score": 0, "verdict": "fail", "reasons": ["unreadable case"]})
    goal, answer = str(case.get("goal", "")), _unwrap(str(case.get("answer", "")))
    if PLAN_CUE in goal:  # a test's verbatim plan: the goal is what its steps were told to do
        try:
            steps = json.loads(goal.split(PLAN_CUE, 1)[1])["steps"]
            goal = " ".join(SAY_CUE.sub("", str(s.get("instruction", ""))) for s in steps if s.get("kind") != "write")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass
    passages = " ".join(_unwrap(str(p)) for p in case.get("passages", ()))
    text = REFERENCE.sub("", answer)
    if not text.strip():
        return json.dumps({"score": 0, "verdict": "fail", "reasons": ["the answer is empty"]})
    reasons: list[str] = []
    parts: list[float] = []
    hard_fail = False
    wanted, said, known = _stems(ARITHMETIC.sub("", goal)), _stems(text), _stems(passages)
    if NO_ANSWER.search(text):  # a refusal is judged on honesty alone
        honest = len(wanted & known) < max(1, len(wanted) // 2)
        parts.append(1.0 if honest else 0.0)
        reasons.append(
            "says it has no answer" + (" and the passages agree" if honest else " but the passages cover it")
        )
        hard_fail = not honest
    else:
        relevance = min(1.0, 2 * len(wanted & said) / len(wanted)) if wanted else 1.0
        parts.append(relevance)
        reasons.append(f"relevance {relevance:.2f}: shares {len(wanted & said)} of {len(wanted)} goal words")
        # Parts of the goal: its questions. An instruction to email the answer is done by a tool
        # step after the answer is written (as the planner plans it), not owed in the answer's text.
        goal_parts = [q for q in re.split(r"\?|\balso\b", goal, flags=re.I) if _stems(q) and not SEND.search(q)]

        def answered(q: str) -> bool:  # a computation is answered by a number, a question by its words
            return bool(re.search(r"\d", text)) if ARITHMETIC.search(q) else bool(_stems(q) & said)

        missed = [q.strip() for q in goal_parts if not answered(q)]
        if len(goal_parts) > 1 and missed:
            hard_fail = True
            reasons.append(f"incomplete: nothing on {missed[0][:60]!r}")
        if len(said) < 4 and not ARITHMETIC.search(text) and not re.search(r"\d", text):
            hard_fail = True
            reasons.append("too thin to answer anything")
        if known:
            sentences = [x for x in re.split(r"(?<=[.!?])\s+", text) if len(_stems(x)) >= 3]
            supported = [x for x in sentences if len(_stems(x) & known) / len(_stems(x)) >= 0.6]
            unsupported = [x for x in sentences if x not in supported and not ARITHMETIC.search(x)]
            share = len(supported) / len(sentences) if sentences else 1.0
            parts.append(share)
            reasons.append(f"grounding {share:.2f}: {len(supported)} of {len(sentences)} sentences supported")
            if unsupported:
                reasons.append(f"unsupported: {unsupported[0][:80]}")
                hard_fail = True
    for line in rubric.splitlines():
        low = line.lower()
        for phrase in QUOTED.findall(line):
            present = phrase.lower() in answer.lower()
            must_not = bool(MUST_NOT.search(low))
            ok = not present if must_not else present
            parts.append(1.0 if ok else 0.0)
            hard_fail = hard_fail or not ok
            reasons.append(f"{'must not' if must_not else 'must'} mention {phrase!r}: {'met' if ok else 'not met'}")
    score = round(sum(parts) / len(parts), 3)
    verdict = "fail" if hard_fail or score < 0.6 else "pass"
    return json.dumps({"score": score, "verdict": verdict, "reasons": reasons})
