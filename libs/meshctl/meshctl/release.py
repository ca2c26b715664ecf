"""``meshctl release``: releases of a tenant's agent behaviour (issue 41).

A release bundle (YAML or JSON, ``mesh_contracts.v1.release.ReleaseBundle``) holds the prompts,
the model routes and the tool rules a tenant's tasks run with; its version is its digest. The
lifecycle, each step a signed change the planner applies and puts on the tenant's audit chain:

    meshctl release draft bundle.yaml --as author.acme.alice        # a new version
    meshctl release eval VERSION --as author.acme.alice --dataset tests/golden/starter.jsonl
    meshctl release canary VERSION --share 0.3 --as approver.acme.bob
    meshctl release status --tenant acme                            # the canary's test, live
    meshctl release promote VERSION --as approver.acme.bob          # or let the test decide
    meshctl release rollback --as approver.acme.bob

``list``, ``show`` and ``diff`` read the tenant's releases (``diff`` also compares files).
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import json
import sys
import time
import uuid
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
from pydantic import ValidationError

from mesh_contracts.v1 import ReleaseChanged, TaskRejected
from mesh_contracts.v1.release import GLOBAL, CanaryTest, ReleaseBundle, ReleaseChange, ReleaseEvaluation
from meshctl import options as opt
from meshctl import workflow as wf
from meshctl.local import MeshError

PACKAGED = "packaged"
"""What ``diff`` and ``show`` call the behaviour shipped in the images (version '')."""


def load_bundle(path: Path) -> ReleaseBundle:
    document = wf.read(path)
    if not isinstance(document, dict):
        raise MeshError(
            f"{path}: a release bundle is a mapping (prompts, routes, tools), not {type(document).__name__}"
        )
    try:
        return ReleaseBundle.model_validate(document)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'bundle'}: {e['msg']}" for e in exc.errors()]
        raise MeshError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems)) from None


def _person(args: argparse.Namespace, role: str) -> tuple[str, Any]:
    """(tenant, signer) of ``--as <role>.<tenant>.<person>``, with the person's key from the mesh
    home; or, with ``--global``, the mesh's default release and the operator's (admin) key."""
    from mesh_identity import Signer
    from meshctl.identity import Identities

    if getattr(args, "global_", False):
        if args.as_:
            raise MeshError("--global changes the mesh's default release as the operator (admin): leave out --as")
        key = Identities(opt.home(args)).signing_key("admin")
        if not key.exists():
            raise MeshError(f"no operator key in {opt.home(args)}: --global needs the mesh's admin identity")
        return GLOBAL, Signer.from_file("admin", key)
    if not args.as_:
        raise MeshError(f"say who: --as {role}.<tenant>.<person>, or --global (the mesh's default, as the operator)")
    parts = args.as_.split(".")
    if len(parts) != 3 or parts[0] != role:
        how = "meshctl authors list" if role == "author" else "meshctl approvers list"
        raise MeshError(f"--as {args.as_!r}: this is done as {role}.<tenant>.<person> ({how})")
    tenant = parts[1]
    if getattr(args, "tenant", None) and args.tenant != tenant:
        raise MeshError(f"{args.as_} acts for tenant {tenant}, not {args.tenant}")
    key = Identities(opt.home(args)).signing_key(args.as_)
    if not key.exists():
        raise MeshError(f"no key for {args.as_} in this mesh home (meshctl {role}s add {parts[2]} --tenant {tenant})")
    return tenant, Signer.from_file(args.as_, key)


def _send(args: argparse.Namespace, role: str, **fields: Any) -> Any:
    """Sign and hand in a change as ``--as``; the planner's answer, or None when it refused (said)."""
    tenant, signer = _person(args, role)
    change = ReleaseChange(tenant=tenant, task_id=f"rel-{uuid.uuid4().hex[:12]}", by=signer.principal,
                           reason=getattr(args, "reason", None) or "", **fields)  # fmt: skip

    async def run() -> Any:
        if tenant == GLOBAL:
            return await _as_operator(args, change, signer)
        async with wf._client(args, tenant) as client:
            return await client.change_release(change, signer, timeout=args.timeout)

    try:
        answer = asyncio.run(run())
    except TimeoutError as exc:
        raise MeshError(f"{exc} (is the planner running?)") from None
    if getattr(args, "json", False):
        print(json.dumps(answer.model_dump(mode="json"), indent=2))
    if not getattr(answer, "accepted", False):
        print(f"meshctl: release {fields.get('action')} refused: {answer.reason}", file=sys.stderr)
        return None
    return answer


async def _as_operator(args: argparse.Namespace, change: ReleaseChange, signer: Any) -> Any:
    """A change of the mesh's default release: published by the operator straight onto the stream
    (an operator is no tenant: no door), answered on the change's id like a tenant's."""
    from mesh_contracts import parse_message
    from mesh_kit import envelope as env
    from meshctl.commands.common import admin

    nc = await admin(args)
    answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Any) -> None:
        model = parse_message(msg.subject, msg.data)
        if isinstance(model, ReleaseChanged | TaskRejected) and not answer.done():
            answer.set_result(model)

    try:
        sub = await nc.subscribe(f"task.*.{GLOBAL}.{change.task_id}.>", cb=on_msg)
        await nc.flush()
        body = change.to_bytes()
        msg_id = env.message_id(change.type, GLOBAL, change.task_id, "")
        await nc.jetstream().publish(change.subject(), body, headers=env.headers_for(signer, change, body, msg_id))
        try:
            return await asyncio.wait_for(answer, timeout=args.timeout)
        except TimeoutError:
            raise TimeoutError(f"no answer to release change {change.task_id} within {args.timeout:g} s") from None
        finally:
            await sub.unsubscribe()
    finally:
        await nc.close()


def _read(args: argparse.Namespace, tenant: str, key: str) -> dict[str, Any] | None:
    async def run() -> dict[str, Any] | None:
        if tenant == GLOBAL:  # the operator reads the mesh's default (a tenant's client may not)
            from meshctl.commands.common import admin

            nc = await admin(args)
            try:
                stored = await nc.jetstream(timeout=5.0).get_last_msg(
                    "KV_releases", f"$KV.releases.{GLOBAL}.{key}", direct=True
                )
            except nats.js.errors.NotFoundError:
                return None
            finally:
                await nc.close()
            found: dict[str, Any] | None = json.loads(stored.data) if stored.data else None
            return found
        async with wf._client(args, tenant) as client:
            return await client.registry(key, bucket="releases")

    return asyncio.run(run())


def _scope(args: argparse.Namespace) -> str:
    """Whose releases a reading command shows: ``--tenant T``, or ``--global`` (the mesh's default)."""
    if getattr(args, "global_", False):
        return GLOBAL
    if not args.tenant:
        raise MeshError("say whose: --tenant T, or --global (the mesh's default release)")
    return str(args.tenant)


def _channel(args: argparse.Namespace, tenant: str) -> dict[str, Any]:
    return _read(args, tenant, "channel") or {"tenant": tenant}


def _version(args: argparse.Namespace, tenant: str, version: str) -> dict[str, Any]:
    found = _read(args, tenant, f"v.{version}")
    if found is None:
        raise MeshError(f"tenant {tenant} has no release {version} (meshctl release list --tenant {tenant})")
    return found


def _bundle_of(args: argparse.Namespace, ref: str) -> tuple[str, ReleaseBundle | None]:
    """(label, bundle) of a file, ``packaged`` (None), ``current`` or a version of ``--tenant``'s."""
    if ref != PACKAGED and (Path(ref).suffix in (".yaml", ".yml", ".json") or Path(ref).is_file()):
        return ref, load_bundle(Path(ref))
    if ref == PACKAGED:
        return PACKAGED, None
    if getattr(args, "global_", False):
        args.tenant = GLOBAL
    if not args.tenant:
        raise MeshError(f"{ref}: no such file; to name a version of a tenant's, say whose: --tenant T (or --global)")
    version = _channel(args, args.tenant).get("current", "") if ref == "current" else ref
    if not version:
        return PACKAGED, None
    return version, ReleaseBundle.model_validate(_version(args, args.tenant, version)["bundle"])


# --- commands -----------------------------------------------------------------------------------


def cmd_draft(args: argparse.Namespace) -> int:
    bundle = load_bundle(args.file)
    answer = _send(args, "author", action="draft", version=bundle.digest(), bundle=bundle.canonical())
    if answer is None:
        return 1
    if not args.json:
        said = "drafted" if answer.changed else "was drafted before (nothing changed)"
        print(f"release {answer.version} {said}; current: {answer.current or PACKAGED}")
        print(f"next: meshctl release eval {answer.version} --as {args.as_} --dataset DATASET")
    return 0


def cmd_canary(args: argparse.Namespace) -> int:
    test = CanaryTest(alpha=args.alpha, beta=args.beta, min_effect=args.min_effect)
    answer = _send(args, "approver", action="canary", version=args.version, share=args.share, test=test,
                   force=args.force)  # fmt: skip
    if answer is None:
        return 1
    if not args.json:
        print(
            f"release {answer.version} serves {answer.share:.0%} of new tasks (current: {answer.current or PACKAGED})"
        )
        print(f"its sequential test decides it (alpha {test.alpha}, beta {test.beta}, effect {test.min_effect}); "
              f"watch: meshctl release status --tenant {answer.tenant}")  # fmt: skip
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    answer = _send(args, "approver", action="promote", version=args.version, force=args.force)
    if answer is None:
        return 1
    if not args.json:
        print(f"release {answer.version} is current: every new task runs it")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    answer = _send(args, "approver", action="rollback", version=args.version or "")
    if answer is None:
        return 1
    if not args.json:
        print(f"rolled back {answer.version or '?'}: new tasks run {answer.current or PACKAGED}"
              + (f" (canary {answer.canary} at {answer.share:.0%})" if answer.canary else ""))  # fmt: skip
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    args.tenant = _scope(args)
    ch = _channel(args, args.tenant)
    rows = []
    for v in ch.get("versions", []):
        rec = _read(args, args.tenant, f"v.{v}") or {}
        ev = (rec.get("evaluations") or [None])[-1]
        rows.append({"version": v, "drafted_by": rec.get("drafted_by", ""), "drafted_at": rec.get("drafted_at", 0),
                     "description": (rec.get("bundle") or {}).get("description", ""),
                     "evaluation": (f"{ev['verdict']} {ev['passed']}/{ev['cases']}" if ev else "none")})  # fmt: skip
    if args.json:
        print(json.dumps({"current": ch.get("current", ""), "canary": ch.get("canary", ""),
                          "share": ch.get("share", 0.0), "versions": rows}, indent=2))  # fmt: skip
        return 0
    print(f"tenant {args.tenant}: current {ch.get('current') or PACKAGED}"
          + (f", canary {ch['canary']} at {ch.get('share', 0):.0%}" if ch.get("canary") else ""))  # fmt: skip
    if not rows:
        print(f"no release drafted (meshctl release draft FILE --as author.{args.tenant}.NAME)")
    for r in rows:
        mark = (
            "  <- current"
            if r["version"] == ch.get("current")
            else ("  <- canary" if r["version"] == ch.get("canary") else "")
        )
        at = time.strftime("%Y-%m-%d %H:%M", time.gmtime(r["drafted_at"]))
        print(
            f"  {r['version']}  {at} UTC  {r['drafted_by']:28}  eval: {r['evaluation']:10}  {r['description'][:40]}{mark}"
        )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    label, bundle = _bundle_of(args, args.ref)
    if args.json:
        rec = _version(args, args.tenant, label) if args.tenant and bundle is not None and len(label) == 16 else {}
        print(json.dumps(rec or {"bundle": bundle.canonical() if bundle else None}, indent=2))
        return 0
    if bundle is None:
        print("the packaged behaviour: the prompts in the services' images, the gateway's own routes, no tool rule")
        return 0
    print(f"release {bundle.digest()}" + (f": {bundle.description}" if bundle.description else ""))
    for pid, p in sorted(bundle.prompts.items()):
        print(f"  prompt {pid}@{p.version}: {len(p.text)} characters")
    for key, route in sorted(bundle.routes.items()):
        print(f"  route {key} -> {route}")
    if bundle.tools.deny:
        print(f"  tools denied: {', '.join(bundle.tools.deny)}")
    if args.tenant and len(label) == 16:
        rec = _version(args, args.tenant, label)
        for e in rec.get("history", []):
            at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.get("at", 0)))
            print(
                f"  {at} UTC  {e['action']:10} by {e.get('by', '')}" + (f": {e['reason']}" if e.get("reason") else "")
            )
    return 0


PACKAGED_PROMPTS = {"planner.plan": ("mesh_planner", "plan"), "worker.system": ("mesh_worker", "system"),
                    "checker.judge": ("mesh_judge", "judge"), "checker.rubric": ("mesh_judge", "rubric")}  # fmt: skip


def packaged_text(pid: str) -> str:
    """The packaged prompt's text, when its service's package is installed beside meshctl."""
    from importlib import resources

    package, name = PACKAGED_PROMPTS[pid]
    try:
        raw = resources.files(package).joinpath("prompts", f"{name}.md").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError):
        return f"({PACKAGED} text of {pid}: {package} is not installed here)\n"
    body = raw.split("\n---\n", 1)[1] if raw.startswith("---\n") and "\n---\n" in raw else raw
    return body.strip("\n") + "\n"


def diff(old: ReleaseBundle | None, new: ReleaseBundle | None, old_label: str, new_label: str) -> list[str]:
    """What changed from ``old`` to ``new`` (None: the packaged behaviour): prompts as unified diffs."""
    a, b = old or ReleaseBundle(), new or ReleaseBundle()
    out: list[str] = []
    for pid in sorted(set(a.prompts) | set(b.prompts)):
        pa, pb = a.prompts.get(pid), b.prompts.get(pid)
        if pa == pb:
            continue
        out.append(f"prompt {pid}: {pa.version if pa else PACKAGED} -> {pb.version if pb else PACKAGED}")
        out += [
            "  " + line.rstrip("\n")
            for line in difflib.unified_diff(
                (pa.text + "\n" if pa else packaged_text(pid)).splitlines(keepends=True),
                (pb.text + "\n" if pb else packaged_text(pid)).splitlines(keepends=True),
                f"{old_label}/{pid}", f"{new_label}/{pid}", n=1,
            )
        ]  # fmt: skip
    for key in sorted(set(a.routes) | set(b.routes)):
        if a.routes.get(key) != b.routes.get(key):
            out.append(
                f"route {key}: {a.routes.get(key) or '(gateway default)'} -> {b.routes.get(key) or '(gateway default)'}"
            )
    if set(a.tools.deny) != set(b.tools.deny):
        added, removed = sorted(set(b.tools.deny) - set(a.tools.deny)), sorted(set(a.tools.deny) - set(b.tools.deny))
        out.append(f"tools denied: +{', '.join(added) or '-'} / -{', '.join(removed) or '-'}")
    return out


def cmd_diff(args: argparse.Namespace) -> int:
    (la, a), (lb, b) = _bundle_of(args, args.old), _bundle_of(args, args.new)
    lines = diff(a, b, la, lb)
    print("\n".join(lines) if lines else f"{la} and {lb} behave the same")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from mesh_contracts.v1.records import ReleaseChannel

    args.tenant = _scope(args)
    ch = ReleaseChannel.model_validate(_channel(args, args.tenant))
    if args.json:
        print(json.dumps(ch.model_dump(mode="json"), indent=2))
        return 0
    print(f"tenant {args.tenant}: current {ch.current or PACKAGED}")
    for line in status_lines(ch):
        print(line)
    return 0


def status_lines(ch: Any) -> list[str]:
    """The canary's test and both versions' live signals, for a person."""

    out = []
    t = ch.test or CanaryTest()
    lower, upper = t.boundaries()
    decided = next((e for e in reversed(ch.history) if e.action in ("promoted", "rolled_back")), None)
    candidate = ch.canary
    if ch.canary:
        out.append(f"canary {ch.canary} at {ch.share:.0%} since "
                   f"{time.strftime('%H:%M:%S', time.gmtime(ch.canary_since))} UTC, by {ch.canary_by}")  # fmt: skip
        out.append(f"test: log-likelihood ratio {ch.llr:+.2f}; promote at {lower:.2f}, roll back at {upper:.2f} "
                   f"(alpha {t.alpha}, beta {t.beta}, effect {t.min_effect})")  # fmt: skip
    elif decided is not None and ch.arms:
        candidate = decided.version
        out.append(f"last canary {decided.version}: {decided.action.replace('_', ' ')} by {decided.by} after "
                   f"{decided.tasks} canary tasks ({decided.bad} bad), ratio {decided.llr:+.2f} "
                   f"(promote at {lower:.2f}, roll back at {upper:.2f})")  # fmt: skip
    for version, arm in ch.arms.items():
        p95 = arm.p95()
        judge = f"{arm.judge_sum / arm.judge_n:.2f}" if arm.judge_n else "-"
        role = "canary " if version == candidate else "current"
        out.append(f"  {role} {version or PACKAGED:16}  tasks {arm.tasks:4}  bad {arm.bad:3}  "
                   f"checks passed {arm.checks_passed / arm.tasks if arm.tasks else 0:.0%}  judge {judge}  "
                   f"cost/task ${arm.mean_cost():.5f}  p95 {p95:.2f}s  tool denials {arm.tool_denials}")  # fmt: skip
    for e in ch.history[-5:]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.at))
        out.append(
            f"  {at} UTC  {e.action:11} {e.version or PACKAGED}  by {e.by}" + (f": {e.reason}" if e.reason else "")
        )
    return out


def _report(path: Path) -> dict[str, Any]:
    """An eval report (``meshctl eval --report``), or a one-line reason it is not one."""
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MeshError(f"no such report: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MeshError(f"{path}: not an eval report: {exc}") from None
    if not isinstance(report, dict) or not isinstance(report.get("cases"), list):
        raise MeshError(f"{path}: not an eval report (no 'cases')")
    return report


def cmd_eval(args: argparse.Namespace) -> int:
    """Run the golden set's cases of the release's tenant with the version pinned, compare with
    the current version's recorded evaluation (or ``--baseline``), and record the result."""
    scope, _ = _person(args, "author")
    tenant = scope
    if scope == GLOBAL:  # a version of the mesh's default: its cases run in one tenant, pinned to it
        if not args.tenant:
            raise MeshError("--global eval runs one tenant's cases with the version pinned: say which, --tenant T")
        tenant = args.tenant
    found = [e for e in entry_points(group="meshctl.release_eval") if e.name == "evaluate"]
    if not found:
        raise MeshError("release eval needs the mesh-eval package (pip install mesh-eval)")
    evaluate = found[0].load()
    ch = _channel(args, scope)
    _version(args, scope, args.version)
    baseline, against = None, ""
    if args.baseline:
        baseline, against = _report(Path(args.baseline)), f"report {args.baseline}"
    elif ch.get("current"):
        cur = _version(args, scope, ch["current"])
        evs = [e for e in cur.get("evaluations", []) if e.get("report")]
        if evs:
            baseline, against = evs[-1]["report"], f"release {ch['current']}'s evaluation"
    if baseline is None:
        raise MeshError(
            f"no baseline to compare with: the current release ({ch.get('current') or PACKAGED}) has no recorded "
            "evaluation; name one with --baseline REPORT (the dataset's committed baseline, or an eval report)"
        )

    async def run() -> tuple[dict[str, Any], ReleaseEvaluation]:
        async with wf._client(args, tenant) as client:
            return await evaluate(  # type: ignore[no-any-return]
                client, args.dataset, args.version, baseline, against=against, concurrency=args.concurrency,
                timeout_s=args.case_timeout, max_regression=args.max_regression,
                max_cost_increase=args.max_cost_increase, max_latency_increase=args.max_latency_increase,
                max_judge_drop=args.max_judge_drop,
            )  # fmt: skip

    report, evaluation = asyncio.run(run())
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2))
    answer = _send(args, "author", action="evaluated", version=args.version, evaluation=evaluation)
    if answer is None:
        return 1
    if args.json:
        return 0 if evaluation.verdict == "pass" else 1
    print(f"release {answer.version}: {evaluation.passed}/{evaluation.cases} cases passed; against {against}")
    for r in evaluation.regressions:
        print(f"  regression: {r}")
    for f in evaluation.failing:
        print(f"  failing: {f}")
    if evaluation.verdict == "pass":
        print(f"gate: pass (next: meshctl release canary {args.version} --share 0.1 --as approver.{tenant}.NAME)")
        return 0
    print("gate: FAIL (canary and promote refuse this version without --force)")
    return 1


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    s = sub.add_parser("release", help="releases of a tenant's behaviour (prompts, model routes, tool rules): draft, "
                                       "eval, canary, promote, rollback, list, show, diff, status")  # fmt: skip
    r = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)

    def reach(p: argparse.ArgumentParser) -> None:
        p.add_argument("--nats-url", default=None)
        p.add_argument("--timeout", type=opt.positive, default=30.0, help="seconds to wait for the planner's answer")

    def acted(p: argparse.ArgumentParser, role: str) -> None:
        p.add_argument("--as", dest="as_", default=None, metavar=role.upper(), help=f"{role}.<tenant>.<person>")
        if role == "author" or p.prog.split()[-1] != "canary":
            p.add_argument("--global", dest="global_", action="store_true",
                           help="the mesh's default release (every tenant without one of its own), as the operator")  # fmt: skip
        p.add_argument("--tenant", type=opt.tenant, default=None, help=f"(the {role}'s tenant)")
        p.add_argument("--reason", default=None, help="why: on the tenant's audit chain")
        p.add_argument("--json", action="store_true")
        reach(p)

    d = r.add_parser("draft", help="a bundle file (YAML or JSON) as a new version (as an author)")
    d.add_argument("file", type=Path, metavar="FILE")
    acted(d, "author")
    d.set_defaults(fn=cmd_draft)

    e = r.add_parser("eval", help="the golden set through the mesh with the version pinned, against the current "
                                  "version's evaluation; recorded (as an author): the gate of canary and promote")  # fmt: skip
    e.add_argument("version", metavar="VERSION")
    e.add_argument("--dataset", required=True, help="golden dataset (JSONL): its cases of the release's tenant run")
    e.add_argument("--baseline", default=None, help="an eval report to compare with (default: the current version's)")
    e.add_argument("--max-regression", type=opt.fraction, default=0.0, help="pass-rate drop tolerated (absolute)")
    e.add_argument("--max-cost-increase", type=opt.at_least_zero, default=0.25, help="mean cost rise tolerated")
    e.add_argument("--max-latency-increase", type=opt.at_least_zero, default=None, help="p95 latency rise tolerated")
    e.add_argument(
        "--max-judge-drop", type=opt.fraction, default=0.05, help="judge mean score drop tolerated (absolute)"
    )
    e.add_argument("--concurrency", type=int, default=4)
    e.add_argument("--case-timeout", type=opt.positive, default=120.0, help="seconds per case")
    e.add_argument("--report", default=None, help="write the run's report here too")
    acted(e, "author")
    e.set_defaults(fn=cmd_eval)

    c = r.add_parser("canary", help="serve a share of new tasks with a version until its test decides (as an approver)")
    c.add_argument("version", metavar="VERSION")
    c.add_argument("--share", type=opt.fraction, required=True, help="share of the tenant's new tasks (0-1)")
    c.add_argument("--alpha", type=opt.fraction, default=0.05, help="chance of rolling back a version no worse")
    c.add_argument("--beta", type=opt.fraction, default=0.10, help="chance of promoting a version worse by the effect")
    c.add_argument("--min-effect", type=opt.fraction, default=0.20, help="the rise in bad tasks worth catching")
    c.add_argument("--force", action="store_true", help="without a passed evaluation (say why: --reason)")
    acted(c, "approver")
    c.set_defaults(fn=cmd_canary)

    p = r.add_parser("promote", help="make a version current for every new task (as an approver)")
    p.add_argument("version", metavar="VERSION")
    p.add_argument("--force", action="store_true", help="without a passed evaluation (say why: --reason)")
    acted(p, "approver")
    p.set_defaults(fn=cmd_promote)

    b = r.add_parser("rollback", help="end the canary, or return to the version current before (as an approver)")
    b.add_argument("version", nargs="?", default=None, metavar="VERSION")
    acted(b, "approver")
    b.set_defaults(fn=cmd_rollback)

    def read(name: str, fn: Any, text: str, *refs: tuple[str, str], json_out: bool = True) -> None:
        """A command that reads releases: whose (``--tenant`` or ``--global``), and how to reach the mesh."""
        c = r.add_parser(name, help=text)
        for dest, metavar in refs:
            c.add_argument(dest, metavar=metavar)
        c.add_argument("--tenant", type=opt.tenant, default=None)
        c.add_argument("--global", dest="global_", action="store_true", help="the mesh's default release")
        if json_out:
            c.add_argument("--json", action="store_true")
        reach(c)
        c.set_defaults(fn=fn)

    read("list", cmd_list, "the tenant's versions, current and canary")
    read("status", cmd_status, "the canary's sequential test and each version's live signals")
    read("show", cmd_show, "a bundle (file, VERSION, current or packaged): prompts, routes, tool rules, story",
         ("ref", "FILE|VERSION|current|packaged"))  # fmt: skip
    read("diff", cmd_diff, "what changes between two bundles (files, versions, current, packaged)",
         ("old", "OLD"), ("new", "NEW"), json_out=False)  # fmt: skip
