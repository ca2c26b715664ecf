#!/usr/bin/env python3
"""Smoke test for the local model server (serve.py): models, one streamed and one plain answer.

    python infra/local-model/smoke.py [--base-url http://127.0.0.1:8088/v1] [--prompt TEXT]

Prints the text, time to first token, tokens/second and usage; exits non-zero on any failure.
Needs only httpx (installed in the project venv).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx

PROMPT = "What is NATS JetStream? Answer in one sentence."


class SmokeError(Exception):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SmokeError(what)


def models(client: httpx.Client, base: str) -> str:
    r = client.get(f"{base}/models")
    check(r.status_code == 200, f"GET /models -> {r.status_code}: {r.text[:200]}")
    data = r.json().get("data") or []
    check(bool(data) and isinstance(data[0].get("id"), str), f"GET /models lists no model: {r.text[:200]}")
    return data[0]["id"]


def streamed(client: httpx.Client, base: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    text, deltas, usage, finish, done = [], 0, None, None, False
    with client.stream("POST", f"{base}/chat/completions", json=body, headers={"accept": "text/event-stream"}) as r:
        if r.status_code != 200:  # (read the body only then: reading it first would defeat streaming)
            raise SmokeError(f"stream -> {r.status_code}: {r.read()[:200]!r}")
        check(r.headers.get("content-type", "").startswith("text/event-stream"), "stream is not text/event-stream")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            check("error" not in chunk, f"error chunk: {data}")
            check(chunk.get("object") == "chat.completion.chunk", f"not a chat.completion.chunk: {data}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") or ""
                if piece:
                    if first is None:
                        first = time.perf_counter() - t0
                    deltas += 1
                    text.append(piece)
                finish = choice.get("finish_reason") or finish
    total = time.perf_counter() - t0
    check(done, "stream ended without data: [DONE]")
    check(bool(text), "stream carried no text")
    check(usage is not None, "no usage chunk although stream_options.include_usage was true")
    check(deltas > 1, "all text came in one chunk: not streamed token by token")
    return {"text": "".join(text), "ttft": first, "total": total, "usage": usage, "finish": finish, "deltas": deltas}


def plain(client: httpx.Client, base: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    t0 = time.perf_counter()
    r = client.post(f"{base}/chat/completions", json=body)
    total = time.perf_counter() - t0
    check(r.status_code == 200, f"POST -> {r.status_code}: {r.text[:200]}")
    data = r.json()
    check(data.get("object") == "chat.completion", f"not a chat.completion: {r.text[:200]}")
    choice = data["choices"][0]
    text = choice["message"]["content"]
    check(isinstance(text, str) and text.strip() != "", "empty answer")
    check(isinstance(data.get("usage"), dict), "no usage")
    return {
        "text": text,
        "total": total,
        "usage": data["usage"],
        "finish": choice.get("finish_reason"),
        "model": data.get("model"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8088/v1")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    base = args.base_url.rstrip("/")
    try:
        with httpx.Client(timeout=args.timeout, trust_env=False) as client:
            model = models(client, base)
            print(f"model: {model}")
            s = streamed(client, base, model, args.prompt, args.max_tokens)
            n = s["usage"]["completion_tokens"]
            gen = s["total"] - s["ttft"]
            rate = (n - 1) / gen if n > 1 and gen > 0 else float("nan")
            print(f"stream: {s['text']!r}")
            print(
                f"  ttft {s['ttft'] * 1000:.0f} ms, total {s['total']:.2f} s, {s['deltas']} deltas, "
                f"{n} tokens, {rate:.1f} tok/s after the first, finish={s['finish']}, usage={s['usage']}"
            )
            p = plain(client, base, model, args.prompt, args.max_tokens)
            n = p["usage"]["completion_tokens"]
            print(f"plain:  {p['text']!r}")
            print(
                f"  total {p['total']:.2f} s, {n} tokens, {n / p['total']:.1f} tok/s overall, "
                f"finish={p['finish']}, usage={p['usage']}"
            )
            same = "same" if p["text"] == s["text"] else "DIFFERENT"
            print(f"greedy: streamed and plain answers are {same}")
    except (SmokeError, httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        print(f"smoke: FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("smoke: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
