#!/usr/bin/env python3
"""Speed of the catalogue's models (catalog.py) on this CPU, and one JSON-schema-constrained plan.

For each installed model: file size, parameters, load time (``Llama(...)``, n_ctx 8192 as
serve.py), prompt processing on a 600-token prompt and generation over 128 tokens (greedy, EOS
ignored), with 1 and 2 threads, the median of 3 runs; then, with 1 thread, one greedy plan
generated unconstrained and one constrained by ``LlamaGrammar.from_json_schema`` (tokens/s, and
whether the text parses as JSON and fits the schema); and the greedy answer to a cite-the-passage
question. Prints markdown tables; ``--json PATH`` writes the numbers. Run it with the local-model
venv's python (stdlib + llama-cpp-python and its jinja2):

    .venv-local-model/bin/python infra/local-model/bench_models.py [--json PATH] [--reps 3] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = Path(__file__).resolve().parent
PROMPT_TOKENS = 600
GEN_TOKENS = 128
PLAN_MAX_TOKENS = 256
QUESTION = (
    "Answer from the passage and cite it as [doc#chunk]. Passage [nats.md#0]: NATS JetStream is the persistence "
    "layer of NATS: it stores messages in streams and replays them to consumers. Question: What is NATS JetStream?"
)
PLAN_REQUEST = [
    {
        "role": "system",
        "content": 'You are a planner. Reply with only a JSON object {"steps": [...]}; each step has "step_id", '
        '"kind" (research, compute, write or answer), "instruction" and "tools" (a list of search_docs, calculator).',
    },
    {"role": "user", "content": "Goal: What is NATS JetStream? Answer in one sentence and cite the docs."},
]
PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "steps": {
            "type": "array",
            "minItems": 1,
            "maxItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "step_id": {"type": "string", "minLength": 1, "maxLength": 16},
                    "kind": {"type": "string", "enum": ["research", "compute", "write", "answer"]},
                    "instruction": {"type": "string", "minLength": 1, "maxLength": 160},
                    "tools": {
                        "type": "array",
                        "maxItems": 2,
                        "items": {"type": "string", "enum": ["search_docs", "calculator"]},
                    },
                },
                "required": ["step_id", "kind", "instruction", "tools"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["steps"],
    "additionalProperties": False,
}
FILLER = (
    "NATS is a messaging system: publishers send messages on subjects and subscribers receive them. "
    "JetStream adds persistence: streams store messages, consumers replay them, and acknowledgements "
    "tell the server what was processed. Key-value buckets and object stores are built on streams. "
)


def load(path: Path, threads: int, n_ctx: int) -> tuple[llama_cpp.Llama, float]:
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(path), **importlib.import_module("catalog").llama_options(n_ctx, threads))
    return llm, time.perf_counter() - t0


def stop_ids(llm: llama_cpp.Llama, catalog: Any) -> set[int]:
    """As serve.py: EOS plus the end-of-turn texts this vocabulary has as one control token."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    ids = {llm.token_eos()}
    for text in catalog.END_OF_TURN:
        t = llm.tokenize(text, add_bos=False, special=True)
        if len(t) == 1 and llama_cpp.llama_vocab_is_control(vocab, t[0]):
            ids.add(t[0])
    return ids


def chat_tokens(llm: llama_cpp.Llama, catalog: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt as serve.py builds it: the GGUF's template (or the catalogue's fallback), the
    model's message normaliser, and BOS when the vocabulary wants one."""
    meta = llm.metadata
    template = meta.get("tokenizer.chat_template") or catalog.fallback_template(meta)
    if template is None:
        template = importlib.import_module("serve").CHATML_TEMPLATE
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = catalog.raise_exception
    text = env.from_string(template).render(
        messages=catalog.message_normaliser(template)(messages),
        add_generation_prompt=True,
        bos_token="",
        eos_token="",
    )
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


def timed_generate(
    llm: llama_cpp.Llama, tokens: list[int], limit: int, stops: frozenset[int] | set[int] = frozenset(), **kw: Any
) -> dict[str, Any]:
    """Greedy generation from a clean context: prompt time (to the first token), then tokens/s over
    the rest (each of those is one decode of one token plus sampling)."""
    llm.reset()
    out: list[int] = []
    t0 = time.perf_counter()
    first = last = t0
    for tok in llm.generate(tokens, temp=0.0, top_k=40, top_p=1.0, min_p=0.0, repeat_penalty=1.0, **kw):
        last = time.perf_counter()
        if not out:
            first = last
        if tok in stops:
            break
        out.append(tok)
        if len(out) >= limit:
            break
    n = len(out)
    return {
        "prompt_s": first - t0,
        "prompt_tps": len(tokens) / (first - t0),
        "tokens": n,
        "gen_tps": (n - 1) / (last - first) if n > 1 and last > first else None,
        "text": llm.detokenize(out).decode("utf-8", errors="replace"),
    }


def speed(path: Path, threads: int, reps: int, n_ctx: int) -> dict[str, Any]:
    loads, pps, tgs = [], [], []
    for _ in range(reps):
        llm, load_s = load(path, threads, n_ctx)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
        prompt = llm.tokenize((FILLER * 12).encode(), add_bos=add_bos)[:PROMPT_TOKENS]
        assert len(prompt) == PROMPT_TOKENS, len(prompt)
        llm.eval(prompt[:8])  # warm-up (first-decode costs), as serve.py does before listening
        r = timed_generate(llm, prompt, GEN_TOKENS)  # no stop tokens: always 128
        loads.append(load_s)
        pps.append(r["prompt_tps"])
        tgs.append(r["gen_tps"])
        llm.close()
    return {
        "threads": threads,
        "load_s": statistics.median(loads),
        "prompt_tps": statistics.median(pps),
        "gen_tps": statistics.median(tgs),
        "samples": {"load_s": loads, "prompt_tps": pps, "gen_tps": tgs},
    }


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> str | None:
    """The first way ``value`` breaks ``schema`` (the subset PLAN_SCHEMA uses), or None."""
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            return f"{where}: not an object"
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                return f"{where}: {key!r} missing"
        for key, item in value.items():
            if key not in props:
                if schema.get("additionalProperties") is False:
                    return f"{where}: unexpected {key!r}"
            elif problem := validate(item, props[key], f"{where}.{key}"):
                return problem
        return None
    if kind == "array":
        if not isinstance(value, list):
            return f"{where}: not an array"
        if not schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)):
            return f"{where}: {len(value)} items"
        return next((p for i, v in enumerate(value) if (p := validate(v, schema["items"], f"{where}[{i}]"))), None)
    if kind == "string" and not isinstance(value, str):
        return f"{where}: not a string"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where}: {value!r} not in the enum"
    if kind == "string" and not schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", len(value)):
        return f"{where}: length {len(value)}"
    return None


def plan(llm: llama_cpp.Llama, catalog: Any) -> dict[str, Any]:
    """One plan unconstrained and one constrained by the schema's grammar, both greedy."""
    tokens, stops = chat_tokens(llm, catalog, PLAN_REQUEST), stop_ids(llm, catalog)
    result: dict[str, Any] = {"prompt_tokens": len(tokens)}
    t0 = time.perf_counter()
    grammar = llama_cpp.LlamaGrammar.from_json_schema(json.dumps(PLAN_SCHEMA), verbose=False)
    result["grammar_build_s"] = time.perf_counter() - t0
    for name, kw in (("unconstrained", {}), ("constrained", {"grammar": grammar})):
        r = timed_generate(llm, tokens, PLAN_MAX_TOKENS, stops, **kw)
        try:
            problem = validate(json.loads(r["text"]), PLAN_SCHEMA)
            r |= {"parses": True, "valid": problem is None, "problem": problem}
        except ValueError as exc:
            r |= {"parses": False, "valid": False, "problem": f"not JSON: {exc}"}
        result[name] = r
    return result


def bench_model(name: str, catalog: Any, reps: int, threads: list[int], n_ctx: int) -> dict[str, Any]:
    path = catalog.resolve(name)
    llm, _ = load(path, 1, n_ctx)
    meta = llm.metadata
    row: dict[str, Any] = {
        "model": name,
        "file": path.name,
        "size_mb": path.stat().st_size / 1e6,
        "params": meta.get("general.parameter_count"),  # absent in both files today
        "size_label": meta.get("general.size_label"),
        "n_params": llama_cpp.llama_model_n_params(llm.model),  # counted from the tensors
        "chat_template": "gguf" if meta.get("tokenizer.chat_template") else "fallback",
    }
    answer = timed_generate(
        llm, chat_tokens(llm, catalog, [{"role": "user", "content": QUESTION}]), 100, stop_ids(llm, catalog)
    )
    row["answer"] = answer["text"]
    row["plan"] = plan(llm, catalog)
    llm.close()
    row["speed"] = [speed(path, t, reps, n_ctx) for t in threads]
    return row


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "loadavg": os.getloadavg(), "llama_cpp": llama_cpp.__version__}


def tables(rows: list[dict[str, Any]]) -> str:
    out = [
        "| model | file MB | params | threads | load s | prompt tok/s (600) | gen tok/s (128) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        params = f"{r['n_params'] / 1e6:.0f}M ({r['size_label']})"
        for s in r["speed"]:
            out.append(
                f"| {r['model']} | {r['size_mb']:.0f} | {params} | {s['threads']} | {s['load_s']:.2f} "
                f"| {s['prompt_tps']:.0f} | {s['gen_tps']:.1f} |"
            )
    out += [
        "",
        "| model | plan, unconstrained: tok/s (tokens) | JSON / valid | plan, grammar: tok/s (tokens) | JSON / valid |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    yes = {True: "yes", False: "no"}
    for r in rows:
        u, c = r["plan"]["unconstrained"], r["plan"]["constrained"]
        cells = [f"{(x['gen_tps'] or 0):.1f} ({x['tokens']}) | {yes[x['parses']]} / {yes[x['valid']]}" for x in (u, c)]
        out.append(f"| {r['model']} | {cells[0]} | {cells[1]} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the numbers (and texts) here")
    parser.add_argument("--reps", type=int, default=3, help="runs per measurement, median reported (default 3)")
    parser.add_argument("--threads", default="1,2", help="thread counts to measure (default 1,2)")
    parser.add_argument("--ctx", type=int, default=8192, help="context window (default 8192, as serve.py)")
    parser.add_argument("--models", help="comma-separated catalogue names (default: every installed one)")
    args = parser.parse_args(argv)
    sys.path[:0] = [] if str(HERE) in sys.path else [str(HERE)]
    catalog = importlib.import_module("catalog")
    names = args.models.split(",") if args.models else [n for n, m in catalog.MODELS.items() if m.installed()]
    threads = [int(t) for t in args.threads.split(",")]
    info = machine()
    rows = []
    t0 = time.perf_counter()
    for name in names:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        rows.append(bench_model(name, catalog, args.reps, threads, args.ctx))
    info |= {"loadavg_end": os.getloadavg(), "wall_s": time.perf_counter() - t0}
    print(
        f"{info['cpu']}, {info['cpus']} CPUs, llama-cpp-python {info['llama_cpp']}, load average "
        f"{info['loadavg'][0]:.2f} -> {info['loadavg_end'][0]:.2f}, {info['wall_s']:.0f} s; median of {args.reps}\n"
    )
    print(tables(rows))
    for r in rows:
        p = r["plan"]
        print(f"\n{r['model']} answer (greedy): {r['answer']!r}")
        for kind in ("unconstrained", "constrained"):
            print(f"{r['model']} plan {kind}: {p[kind]['text']!r} ({p[kind]['problem'] or 'valid'})")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "models": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
