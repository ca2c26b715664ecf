"""Commands as a tenant's client: submit a task and follow it (``submit``), halt, resume or cancel
it, send a workflow task a signal, and add documents to the tenant's retrieval index (``ingest``)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from mesh_contracts.v1 import (
    DOCUMENT_TYPES,
    HeldCall,
    ProgressEvent,
    TaskCompleted,
    TaskFailed,
    TaskLimits,
    TaskRejected,
    TokenDelta,
    UsageRecorded,
)
from meshctl import options as opt
from meshctl.commands.common import absent, tenant_client
from meshctl.explain import explain
from meshctl.local import MeshError

if TYPE_CHECKING:
    from meshctl.submission import Followed


def print_held(held: Sequence[HeldCall], file: TextIO = sys.stdout) -> None:
    """The calls the task went on without: not part of the answer, and, the task having ended,
    their approvals void (a decision now performs nothing)."""
    if not held:
        return
    print(f"\nheld for a human decision ({len(held)}), not performed; the answer does not include them, and "
          "their approvals are void now that the task has ended:", file=file)  # fmt: skip
    for h in held:
        where = f" -> {', '.join(h.destinations)}" if h.destinations else ""
        print(f"  {h.approval_id}  {h.tool}{where}  (step {h.step_id})", file=file)


def cmd_submit(args: argparse.Namespace) -> int:
    from meshctl.submission import Resubmit

    if args.goal is None and args.workflow is None:
        args.usage("a goal is needed (or --workflow NAME, whose nodes say what to do)")
    if args.agent is not None and args.workflow is not None:
        args.usage("a task runs a workflow (--workflow) or an agent profile (--agent), not both")
    if args.inputs and args.workflow is None:
        args.usage("--input is for a workflow's inputs: name the workflow with --workflow")
    if args.goal is None:
        args.goal = f"run workflow {args.workflow}"
    client = tenant_client(args)
    show = _Feed(quiet=args.json)

    async def run() -> int:
        async with client:
            if not args.json and args.follow:
                print(f"submitting to tenant {args.tenant}: {args.goal}", flush=True)
            limits = {k: v for k, v in (("deadline_s", args.deadline), ("max_queue_s", args.max_queue),
                                         ("stall_timeout_s", args.stall_timeout)) if v is not None}  # fmt: skip
            seen = await client.submit(
                args.goal, task_id=args.task_id, policy=args.policy, priority=args.priority, follow=args.follow,
                timeout=args.timeout, on_event=show if args.follow else None, labels=dict(args.label or ()),
                limits=TaskLimits(**limits) if limits else None,
                resubmit=Resubmit(args.retry, args.retry_max_wait) if args.retry else None,
                refusal_wait_s=0.0 if args.follow else args.refusal_wait,
                workflow=args.workflow, inputs=dict(args.inputs or ()), agent=args.agent,
            )  # fmt: skip
        return _followed(args, seen) if args.follow else _submitted(args, seen)

    return asyncio.run(run())


class _Feed:
    """What ``submit --follow`` prints while the task runs: its progress, each model call's usage
    with the task's total so far, and the text a model call streams, on a line of its own."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet  # --json: the outcome alone
        self.live = ""  # the model call whose tokens are being printed, if a line is open
        self.calls: dict[str, tuple[int, float]] = {}  # model calls seen: call id -> (tokens, cost)

    def __call__(self, model: object) -> None:
        if self.quiet:
            return
        if isinstance(model, TokenDelta):
            self._token(model)
            return
        if isinstance(model, (ProgressEvent, UsageRecorded)) and self.live:
            print(flush=True)
            self.live = ""
        if isinstance(model, ProgressEvent):
            print(f"  [{model.source:>13}] {model.stage:<16} {model.message}", flush=True)
        elif isinstance(model, UsageRecorded):
            tokens = model.input_tokens + model.output_tokens
            self.calls[model.call_id] = (tokens, model.cost_usd)
            failed = f" (failed: {model.error[:80]})" if model.error else ""
            total_t, total_c = sum(t for t, _ in self.calls.values()), sum(c for _, c in self.calls.values())
            print(f"  [{model.agent:>13}] {'usage':<16} {model.role or model.agent} {model.provider}/{model.model}: "
                  f"{tokens} tokens, ${model.cost_usd:.6f}{failed}; task so far {total_t} tokens, ${total_c:.6f}",
                  flush=True)  # fmt: skip

    def _token(self, model: TokenDelta) -> None:
        if model.kind == "end":
            if self.live == model.call_id:
                print(flush=True)
                self.live = ""
            return
        if model.call_id != self.live:
            if self.live:
                print(flush=True)
            self.live = model.call_id
            print(f"  [{'worker':>13}] {'streaming ' + model.step_id:<16} ", end="", flush=True)
        if model.kind == "delta":
            print(model.text, end="", flush=True)
        else:  # the text so far is void: a retry or a fallback model follows
            print(f"  <discarded: {model.text}>", flush=True)
            self.live = ""


def _followed(args: argparse.Namespace, seen: Followed) -> int:
    """With --follow: the outcome, said or as JSON; exit 0 completed, 1 failed or refused for good,
    3 no outcome within --timeout, 4 refused for a while (worth submitting again)."""
    out = seen.outcome
    if args.json:
        print(json.dumps({"task_id": seen.task_id, "latency_s": round(seen.latency_s, 3),
                          "outcome": out.model_dump(mode="json") if out else None, "events": len(seen.events),
                          "attempts": seen.attempts, "explain": explain(out, seen.events, seen.usage)},
                         indent=2))  # fmt: skip
    else:
        if seen.refusals:
            print(f"\n{_resubmitted(seen)}", flush=True)
        _show_outcome(seen)
    if out is None:
        print(f"meshctl: task {seen.task_id} did not finish within {args.timeout:.0f}s", file=sys.stderr)
        return 3
    if isinstance(out, TaskRejected) and out.retry_after_s is not None:
        return 4  # refused at the door: worth submitting again after retry_after_s
    return 0 if isinstance(out, TaskCompleted) else 1


def _show_outcome(seen: Followed) -> None:
    """The outcome; after a failure (``explain.failed``), on stderr as its verdict, what failed
    and what to try next (``meshctl.explain``)."""
    out = seen.outcome
    if isinstance(out, TaskCompleted):
        u = out.usage
        print(f"\ncompleted {seen.task_id} in {seen.latency_s:.2f}s ({out.steps} steps)\n\n{out.answer}\n")
        for c in out.citations:
            print(f"  cited: {c.doc_id} v{c.version[:8]} chunk {c.chunk_id} sha256:{c.chunk_hash[:12]}")
        print(
            f"\nusage: {u.input_tokens} input + {u.output_tokens} output tokens "
            f"in {u.calls} model calls, ${u.cost_usd:.6f}"
        )
        print_held(out.held)
    elif isinstance(out, TaskRejected) and out.retry_after_s is not None:
        print(
            f"\nrefused {seen.task_id} ({out.code}): {out.reason}; retry after {out.retry_after_s:g}s",
            file=sys.stderr,
        )
    elif isinstance(out, (TaskFailed, TaskRejected)):
        print(f"\n{out.type.split('.')[1]} {seen.task_id}: {out.reason}", file=sys.stderr)
        print_held(getattr(out, "held", ()), file=sys.stderr)
    for line in explain(out, seen.events, seen.usage):
        print(f"  {line}", file=sys.stderr)


def _submitted(args: argparse.Namespace, seen: Followed) -> int:
    """Without --follow: the id once stored and not refused within --refusal-wait; a refusal
    is said (on stderr, as with --follow) and exits 4 (1 if it is not worth retrying)."""
    out = seen.outcome
    refused = out if isinstance(out, TaskRejected) else None
    if args.json:
        print(json.dumps({"task_id": seen.task_id, "outcome": refused.model_dump(mode="json") if refused else None,
                          "taken_up": seen.taken_up, "attempts": seen.attempts}, indent=2))  # fmt: skip
    elif refused is None:
        print(seen.task_id)
    if seen.refusals and not args.json:
        print(_resubmitted(seen), file=sys.stderr)
    if refused is not None:
        if not args.json:
            retry = f"; retry after {refused.retry_after_s:g}s" if refused.retry_after_s is not None else ""
            print(f"refused {seen.task_id} ({refused.code}): {refused.reason}{retry}", file=sys.stderr)
        return 4 if refused.retry_after_s is not None else 1
    if not seen.taken_up and args.refusal_wait > 0 and not args.json:
        print(f"meshctl: {seen.task_id} is stored; the planner has not decided on it within "
              f"{args.refusal_wait:g}s (a backlog, or a run slot): it may still be refused "
              "(--follow waits for the outcome)", file=sys.stderr)  # fmt: skip
    return 0


def _resubmitted(seen: Followed) -> str:
    codes = ", ".join(f"{r.code} (retry after {r.retry_after_s:g}s)" for r in seen.refusals)
    return f"submitted {seen.attempts} times, refused before: {codes}"


def cmd_signal(args: argparse.Namespace) -> int:
    """``meshctl signal TASK NAME [--payload JSON]``: as the tenant's client, and say what the
    planner made of it (taken by its node, kept until the node is reached, or refused and why)."""
    if args.payload is not None and args.payload_file is not None:
        return absent("give the payload with --payload or --payload-file, not both")
    text = args.payload
    if args.payload_file is not None:
        try:
            text = Path(args.payload_file).read_text(encoding="utf-8")
        except OSError as exc:
            return absent(f"--payload-file {args.payload_file}: {exc.strerror or exc}")
    try:
        payload = json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        return absent(f"the payload is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    client = tenant_client(args)

    async def run() -> int:
        async with client:
            seen = await client.signal(args.task_id, args.name, payload, key=args.key, timeout=args.timeout)
        if isinstance(seen, ProgressEvent):
            print(f"{args.task_id}: {seen.message}")
            return 1 if seen.stage == "signal.refused" else 0
        if isinstance(seen, (TaskCompleted, TaskFailed, TaskRejected)):
            return absent(f"task {args.task_id} has already finished ({seen.type}); no signal can reach it")
        return absent(f"the planner said nothing of signal {args.name} to {args.task_id} within {args.timeout:g}s "
                       "(is the task id right, and the planner running?)")  # fmt: skip

    return asyncio.run(run())


def cmd_control(args: argparse.Namespace) -> int:
    """``meshctl halt|resume|cancel TASK``: as the tenant's client, and wait for the planner."""
    client = tenant_client(args)
    reason = (args.reason or "").strip() or f"{args.command} from meshctl"

    async def run() -> int:
        async with client:
            seen = await client.control(args.command, args.task_id, reason, timeout=args.timeout)
        if isinstance(seen, ProgressEvent):
            print(f"{args.task_id}: {seen.message}")
            return 0
        if isinstance(seen, TaskFailed) and args.command == "cancel" and "cancelled" in seen.reason:
            print(f"{args.task_id}: {seen.reason}")
            return 0
        if isinstance(seen, (TaskCompleted, TaskFailed, TaskRejected)):
            return absent(f"task {args.task_id} has already finished ({seen.type}); nothing to {args.command}")
        hint = " (is it halted?)" if args.command == "resume" else " (is the task id right, and the planner running?)"
        return absent(f"the planner did not apply {args.command} to {args.task_id} within {args.timeout:g}s{hint}")

    return asyncio.run(run())


INGEST_TYPES = DOCUMENT_TYPES
INGEST_MAX_BYTES = 4_400_000  # what one ingest message carries, base64-encoded


def _documents(path: Path) -> tuple[list[tuple[str, Path]], list[Path]]:
    """(doc id, file) for every supported file under ``path``, and the files skipped. The doc id
    is the path relative to the directory given (the file name for a single file)."""
    if not path.exists():
        raise MeshError(f"no such file or directory: {path}")
    if path.is_file():
        if path.suffix.lower() not in INGEST_TYPES:
            raise MeshError(f"unsupported document type {path.suffix or '(none)'!r} for {path.name} "
                            f"(supported: {' '.join(sorted(INGEST_TYPES))})")  # fmt: skip
        return [(path.name, path)], []
    docs: list[Path] = []
    skipped: list[Path] = []
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        (docs if f.suffix.lower() in INGEST_TYPES else skipped).append(f)
    return [(f.relative_to(path).as_posix(), f) for f in docs], skipped


def cmd_ingest(args: argparse.Namespace) -> int:
    """``meshctl ingest PATH --tenant T``: add or replace documents in the tenant's index."""
    docs, skipped = _documents(Path(args.path))
    if not docs:
        raise MeshError(f"no documents to ingest under {args.path} (supported: {' '.join(sorted(INGEST_TYPES))})")
    too_big = [f for _, f in docs if f.stat().st_size > INGEST_MAX_BYTES]
    if too_big:
        raise MeshError(f"{too_big[0]} is {too_big[0].stat().st_size} bytes; one document may be at most "
                        f"{INGEST_MAX_BYTES} bytes (split it)")  # fmt: skip
    client = tenant_client(args)

    async def run() -> int:
        failed = chunks = 0
        started = time.perf_counter()
        async with client:
            for doc_id, f in docs:
                got = await client.ingest(doc_id, f.read_bytes(), INGEST_TYPES[f.suffix.lower()], timeout=args.timeout)
                if got is None:
                    failed += 1
                    print(f"  {doc_id}: no answer within {args.timeout:g}s (is the rag service running?)")
                elif not got.ok:
                    failed += 1
                    print(f"  {doc_id}: refused: {got.error}")
                else:
                    chunks += got.chunks
                    what = ("unchanged" if got.replaced == got.version else
                            f"replaced v{got.replaced[:8]}" if got.replaced else "new")  # fmt: skip
                    print(f"  {doc_id}: {got.chunks} chunks, v{got.version[:8]} ({what}), index {got.index_version}")
        took = time.perf_counter() - started
        for f in skipped:
            print(f"  skipped {f} (unsupported type)")
        print(f"ingested {len(docs) - failed}/{len(docs)} document(s), {chunks} chunks in {took:.1f}s "
              f"into tenant {args.tenant}")  # fmt: skip
        return 1 if failed else 0

    return asyncio.run(run())


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """Commands as a tenant's client: submit and follow a task, control it, ingest documents."""
    s = sub.add_parser("submit", help="submit a task as a tenant's client")
    s.add_argument("goal", nargs="?", default=None, help="what you want done (with --workflow: optional)")
    s.add_argument("--tenant", type=opt.tenant, default="demo")
    s.add_argument("--task-id", type=opt.tenant, default=None, help="defaults to a random id")
    s.add_argument(
        "--priority", type=opt.priority, default=5, help="0 (lowest) to 9 (highest): first within the tenant's turn"
    )
    s.add_argument("--follow", action="store_true", help="print progress live and wait for the result")
    s.add_argument("--timeout", type=opt.positive, default=120.0, help="seconds to wait with --follow")
    s.add_argument("--json", action="store_true", help="print the outcome as JSON")
    s.add_argument("--retry", type=opt.whole, default=0, metavar="N",
                   help="refused for a while (too many in flight, over the rate, the mesh near full...), wait its "
                        "retry-after and resubmit, at most N times; the same task id, so never a second task")  # fmt: skip
    s.add_argument("--retry-max-wait", type=opt.at_least_zero, default=60.0, metavar="S",
                   help="with --retry: at most S seconds of waiting in all (default 60)")  # fmt: skip
    s.add_argument("--refusal-wait", type=opt.at_least_zero, default=5.0, metavar="S",
                   help="without --follow: wait up to S seconds for the planner to refuse or take up the task "
                        "(default 5; 0: print the id once stored)")  # fmt: skip
    s.add_argument(
        "--policy",
        type=opt.policy,
        default=None,
        help='what the checker holds the answer to, as JSON or @FILE: {"forbidden_terms": [...], '
        '"require_citations": true, "rubric": "...", "output_schema": {...}, ...}',
    )
    s.add_argument("--label", type=opt.label, action="append", metavar="KEY=VALUE",
                   help="charge the task to a team, a user...: its spend records carry it (repeatable)")  # fmt: skip
    s.add_argument("--deadline", type=opt.positive, default=None, metavar="S",
                   help="seconds from submission after which the task fails (default 300)")  # fmt: skip
    s.add_argument("--max-queue", type=opt.positive, default=None, metavar="S",
                   help="most seconds the task may wait in queues in all before it is cancelled (default: no limit)")  # fmt: skip
    s.add_argument("--stall-timeout", type=opt.positive, default=None, metavar="S",
                   help="seconds without progress, queue time excluded, before it counts as stalled (default 120)")  # fmt: skip
    s.add_argument("--workflow", type=opt.workflow_ref, default=None, metavar="NAME[@VERSION]",
                   help="run the tenant's registered workflow: NAME (its latest version), NAME@latest or "
                        "NAME@VERSION; the task keeps that version to the end (meshctl workflow list)")  # fmt: skip
    s.add_argument("--agent", type=opt.agent_ref, default=None, metavar="NAME[@VERSION]",
                   help="hand the goal to one of the tenant's agent profiles as one step (meshctl agent list)")  # fmt: skip
    s.add_argument("--input", type=opt.workflow_input, action="append", metavar="KEY=VALUE", dest="inputs",
                   help="an input of the workflow (a JSON value, or else text; repeatable)")  # fmt: skip
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_submit, usage=s.error)
    _register_control(sub)
    _register_rest(sub)


def _register_control(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """halt, resume, cancel."""
    for verb, text in (
        ("halt", "pause a task: every service refuses its next model or tool call until resume"),
        ("resume", "resume a halted task: its halted steps run again"),
        ("cancel", "cancel a task: it fails with your reason, its dependents are not run"),
    ):
        s = sub.add_parser(verb, help=text)
        s.add_argument("task_id", type=opt.task_id, metavar="TASK_ID")
        s.add_argument("--tenant", type=opt.tenant, default="demo")
        s.add_argument("--reason", default=None, help="recorded on the task and quoted by every service that refuses")
        s.add_argument("--timeout", type=opt.positive, default=10.0, help="seconds to wait for the planner to apply it")
        s.add_argument("--nats-url", default=None)
        s.set_defaults(fn=cmd_control)


def _register_rest(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    """signal and ingest."""
    s = sub.add_parser("signal", help="send a named signal to a workflow task (its signal node takes it)")
    s.add_argument("task_id", type=opt.task_id, metavar="TASK_ID")
    s.add_argument("name", type=opt.signal_name, metavar="NAME", help="the signal's name (what the node waits for)")
    s.add_argument("--payload", default=None, help="the signal's payload, a JSON value (the node's output)")
    s.add_argument("--payload-file", default=None, help="read the JSON payload from this file")
    s.add_argument(
        "--key",
        type=opt.signal_key,
        default=None,
        help="the signal's id: sent again with the same key, it is stored once (default: a new one)",
    )
    s.add_argument("--tenant", type=opt.tenant, default="demo")
    s.add_argument("--timeout", type=opt.positive, default=10.0, help="seconds to wait for the planner's answer")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_signal)

    s = sub.add_parser("ingest", help="add or replace documents (md, txt, html, pdf) in a tenant's retrieval index")
    s.add_argument("path", help="a file, or a directory (every supported file under it)")
    s.add_argument("--tenant", type=opt.tenant, default="demo")
    s.add_argument("--timeout", type=opt.positive, default=120.0, help="seconds to wait for each document")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_ingest)
