"""``meshctl eval``: run a golden dataset on the running mesh and gate on it, or calibrate the
judge against human labels. meshctl finds this command through the ``meshctl.commands`` entry
point of this package, so meshctl itself does not depend on the checker or the model gateway."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from mesh_eval.errors import EvalError
from meshctl import options as opt
from meshctl.local import MeshError

EVAL_RUN_OPTIONS = {
    "timeout": 120.0,
    "min_pass_rate": 1.0,
    "baseline": None,
    "max_regression": 0.0,
    "max_cost_increase": 0.25,
    "max_latency_increase": None,
    "filter": (),
    "case": (),
    "nats_url": None,
}
EVAL_CALIBRATE_OPTIONS = {"min_agreement": 0.0, "min_score": 0.6}


def cmd_eval(args: argparse.Namespace) -> int:
    """``meshctl eval DATASET``: run a golden dataset on the running mesh and gate on it;
    ``meshctl eval calibrate [FILE]``: the judge against human labels, no mesh needed."""
    from mesh_eval.calibration import DEFAULT_CALIBRATION

    target = args.target
    calibrating = target[0] == "calibrate"
    if len(target) > (2 if calibrating else 1):
        args.usage("eval takes one DATASET, or: eval calibrate [FILE]")
    own, other = (
        (EVAL_CALIBRATE_OPTIONS, EVAL_RUN_OPTIONS) if calibrating else (EVAL_RUN_OPTIONS, EVAL_CALIBRATE_OPTIONS)
    )
    wrong = [name for name in other if hasattr(args, name)]
    if wrong:
        mode = "eval calibrate" if calibrating else "eval DATASET"
        args.usage(f"--{wrong[0].replace('_', '-')} is not an option of {mode}")
    for name, default in own.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    try:
        if calibrating:
            return _eval_calibrate(args, target[1] if len(target) > 1 else DEFAULT_CALIBRATION)
        return _eval_run(args, target[0])
    except EvalError as exc:
        raise MeshError(str(exc)) from None


def _report_path(args: argparse.Namespace, default: Path | None) -> Path | None:
    path = Path(args.report) if args.report else default
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MeshError(f"cannot create the report's directory {path.parent}: {exc.strerror}") from None
    return path


def _write(report: dict[str, Any], path: Path | None) -> None:
    from mesh_eval.report import write_report

    if path is not None:
        try:
            write_report(report, path)
        except OSError as exc:
            raise MeshError(f"cannot write the report {path}: {exc.strerror}") from None


def _eval_run(args: argparse.Namespace, dataset_path: str) -> int:
    from mesh_eval.baseline import compare
    from mesh_eval.dataset import load_dataset
    from mesh_eval.harness import run_dataset
    from mesh_eval.render import render_comparison, render_summary, render_table
    from mesh_eval.report import default_report_path, gate_failures, load_report

    dataset = load_dataset(dataset_path).select(tags=args.filter, case_ids=args.case)
    baseline = load_report(args.baseline) if args.baseline else None
    path = _report_path(args, default_report_path())
    report = asyncio.run(
        run_dataset(
            dataset,
            home=opt.home(args),
            nats_url=args.nats_url,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            progress=True,
        )
    )
    if baseline is not None:
        report["comparison"] = compare(
            baseline,
            report,
            max_regression=args.max_regression,
            max_cost_increase=args.max_cost_increase,
            max_latency_increase=args.max_latency_increase,
            baseline_path=args.baseline,
        )
    _write(report, path)
    if args.json:
        print(json.dumps(report, indent=2))
        print(f"report: {path}", file=sys.stderr)
    else:
        print(render_table(report))
        print()
        print(render_summary(report))
        if baseline is not None:
            print()
            print(render_comparison(report["comparison"]))
        print(f"report: {path}")
    failures = gate_failures(report, min_pass_rate=args.min_pass_rate)
    for failure in failures:
        print(f"meshctl: eval gate failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def _eval_calibrate(args: argparse.Namespace, file: str) -> int:
    from mesh_eval.calibration import calibrate
    from mesh_eval.render import render_calibration

    path = _report_path(args, None)
    report = asyncio.run(calibrate(file, min_score=args.min_score, concurrency=args.concurrency))
    _write(report, path)
    print(json.dumps(report, indent=2) if args.json else render_calibration(report))
    if path is not None and not args.json:
        print(f"report: {path}")
    agreement = report["agreement"] or 0.0
    if agreement < args.min_agreement:
        print(
            f"meshctl: eval gate failed: judge agreement {agreement:.4f} is below --min-agreement {args.min_agreement:g}",
            file=sys.stderr,
        )
        return 1
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``eval`` to meshctl's commands (entry point ``meshctl.commands``)."""
    s = sub.add_parser(
        "eval",
        usage="%(prog)s [options] DATASET\n       %(prog)s calibrate [FILE] [options]",
        help="run a golden dataset on the running mesh and gate on it; or: eval calibrate [FILE] (the judge)",
        description="eval DATASET: submit every case of a JSONL golden dataset to the running mesh, hold each "
        "outcome to its expectations, print a table and write a JSON report; exit 1 when a gate fails. "
        "eval calibrate [FILE]: run the LLM judge on human-labelled answers (no mesh) and report the agreement. "
        "Formats: tests/golden/README.md.",
    )
    s.add_argument("target", nargs="+", metavar="DATASET | calibrate [FILE]")
    s.add_argument(
        "--concurrency", type=opt.count, default=4, metavar="N", help="tasks (or judge calls) at a time (default 4)"
    )
    s.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    s.add_argument("--report", default=None, metavar="PATH",
                   help="write the JSON report here (eval DATASET default: .mesh/eval/report-<UTC time>.json)")  # fmt: skip
    none = argparse.SUPPRESS
    r = s.add_argument_group("eval DATASET")
    r.add_argument(
        "--timeout", type=opt.positive, default=none, metavar="S", help="seconds per case before it is a timeout (120)"
    )
    r.add_argument(
        "--filter", action="append", default=none, metavar="TAG", help="only cases with this tag (repeatable)"
    )
    r.add_argument("--case", action="append", default=none, metavar="ID", help="only this case (repeatable)")
    r.add_argument("--min-pass-rate", type=opt.fraction, default=none, metavar="R", help="exit 1 below this (1.0)")
    r.add_argument(
        "--baseline", default=none, metavar="REPORT", help="compare with an earlier report; exit 1 on a regression"
    )
    r.add_argument("--max-regression", type=opt.fraction, default=none, metavar="D",
                   help="allowed absolute drop of the pass rate or a property's rate (0.0)")  # fmt: skip
    r.add_argument("--max-cost-increase", type=opt.at_least_zero, default=none, metavar="REL",
                   help="allowed relative rise of the mean cost per case (0.25)")  # fmt: skip
    r.add_argument("--max-latency-increase", type=opt.at_least_zero, default=none, metavar="REL",
                   help="allowed relative rise of the p95 latency (default: not checked)")  # fmt: skip
    r.add_argument("--nats-url", default=none, metavar="URL", help="default: the running mesh's")
    c = s.add_argument_group("eval calibrate [FILE]  (FILE default: tests/golden/judge-calibration.jsonl)")
    c.add_argument("--min-agreement", type=opt.fraction, default=none, metavar="A", help="exit 1 below this (0.0)")
    c.add_argument("--min-score", type=opt.fraction, default=none, metavar="S", help="the judge's pass score (0.6)")
    s.set_defaults(fn=cmd_eval, usage=s.error)
