"""What ``meshctl eval`` prints (without ``--json``): a report as a per-case table with every
failed property in full, its one-line summary, its comparison with a baseline, and a judge
calibration's agreement, confusion matrix and disagreements.

Public API::

    render_table(report) / render_summary(report) / render_comparison(comparison) / render_calibration(report) -> str
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[-1] = 0  # the last column runs free

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "…"


def render_table(report: dict[str, Any], *, detail_chars: int = 60) -> str:
    """The per-case table, then every failed case's failed properties in full."""
    rows, failures = [], []
    for c in report["cases"]:
        failed = [
            _cut(f"{name}: {p['detail']}", detail_chars) for name, p in c["properties"].items() if not p["passed"]
        ]
        if not c["passed"]:
            failures.append(f"{c['id']} ({c['task_id']}, {c['outcome']}):")
            failures += [f"  {name}: {p['detail']}" for name, p in c["properties"].items() if not p["passed"]]
        rows.append(
            (
                c["id"],
                c["outcome"],
                "PASS" if c["passed"] else "FAIL",
                f"{c['cost_usd']:.4f}",
                str(c["tokens"]["input"] + c["tokens"]["output"]),
                _num(c.get("latency_s"), ".2f"),
                _num(c.get("judge_score"), ".2f"),
                "; ".join(failed),
            )
        )
    header = ("ID", "OUTCOME", "RESULT", "COST $", "TOKENS", "LATENCY S", "JUDGE", "FAILED PROPERTIES")
    lines = _table(header, rows, right={3, 4, 5, 6})
    if failures:
        lines += ["", "failed cases:", *failures]
    return "\n".join(lines)


def render_summary(report: dict[str, Any]) -> str:
    s = report["summary"]
    lat, judge = s["latency_s"], s["judge_score"]
    versions = ", ".join(f"{role}={'|'.join(refs)}" for role, refs in report.get("prompt_versions", {}).items())
    return (
        f"pass rate {s['passed']}/{s['cases']} ({s['pass_rate'] * 100:.1f}%)  "
        f"latency p50 {_num(lat['p50'], '.2f')}s p95 {_num(lat['p95'], '.2f')}s  "
        f"cost ${s['cost_usd']['total']:.4f}  "
        f"judge mean {_num(judge['mean'], '.2f')} (n={judge['n']})  "
        f"prompts {versions or 'none reported'}"
    )


def render_comparison(comparison: dict[str, Any]) -> str:
    lines = [f"compared with baseline {comparison['baseline']} over {comparison['common_cases']} common case(s):"]
    lines += [f"  warning: {w}" for w in comparison["warnings"]]
    for m in comparison["metrics"]:
        rel = m.get("relative")
        rel_s = f" ({rel:+.1%})" if isinstance(rel, float) else (" (from 0)" if rel == "inf" else "")
        delta = "n/a" if m["delta"] is None else f"{m['delta']:+g}{rel_s}"
        lines.append(
            f"  {m['metric']:<32} {_num(m['baseline'], 'g'):>10} -> {_num(m['now'], 'g'):<10} "
            f"{delta:<20} {'OK' if m['ok'] else 'REGRESSION'}"
        )
    for i in comparison["newly_failing"]:
        lines.append(f"  case {i}: passed in the baseline, fails now  REGRESSION")
    for key, text in (
        ("newly_passing", "failed in the baseline, passes now"),
        ("missing_now", "in the baseline only (not compared)"),
        ("new_cases", "not in the baseline (not compared)"),
    ):
        if comparison[key]:
            lines.append(f"  {text}: {', '.join(comparison[key])}")
    lines.append(f"  {comparison['regressions']} regression(s)" if comparison["regressions"] else "  no regression")
    return "\n".join(lines)


def render_calibration(report: dict[str, Any]) -> str:
    c, fd, ms, j = report["confusion"], report["fail_detection"], report["mean_score"], report["judge"]
    lines = [
        f"judge {j['model'] or '?'} (prompt {j['prompt_version'] or '?'}), min score {j['min_score']:g}, "
        f"{report['n']} labelled answer(s) from {report['file']}",
        f"agreement {_num(report['agreement'], '.3f')}  Cohen's kappa {_num(report['kappa'], '.3f')}",
        "confusion (rows: human label, columns: judge verdict)",
        f"  {'':<12}{'judge pass':>12}{'judge fail':>12}{'error':>8}",
    ]
    for lab in ("pass", "fail"):
        lines.append(f"  {'label ' + lab:<12}{c[lab]['pass']:>12}{c[lab]['fail']:>12}{c[lab]['error']:>8}")
    lines.append(
        f'detecting "fail": precision {_num(fd["precision"], ".3f")}  recall {_num(fd["recall"], ".3f")}  '
        f"F1 {_num(fd['f1'], '.3f')}  (support {fd['support']})"
    )
    lines.append(f"mean judge score: label pass {_num(ms['pass'], '.3f')}, label fail {_num(ms['fail'], '.3f')}")
    if report["disagreements"]:
        lines.append(f"disagreements ({len(report['disagreements'])}):")
        for d in report["disagreements"]:
            lines.append(
                f"  {d['id']}: label {d['label']}, judge {d['judge']} ({_num(d['score'], '.2f')}): "
                f"{d['reason'] or '-'}" + (f"  | human: {d['note']}" if d["note"] else "")
            )
    else:
        lines.append("no disagreement")
    return "\n".join(lines)
