"""The rules of `make deploy-check` that no schema can express, each a function from rendered
objects to the errors it finds (an empty list: the objects keep the rule): every workload spreads
over nodes and zones under a PodDisruptionBudget, a partitioned budget runs a pod per partition,
each ScaledObject scales a workload of the render on exactly the durable consumers of its service
(``mesh_contracts.topology``) with metadata KEDA's scaler reads, a workload without durables (the
edge) is scaled by a HorizontalPodAutoscaler of its own instead, images are pinned by digest, and
NATS chart values are keys the pinned chart has.
"""

from __future__ import annotations

import re
from typing import Any

from mesh_contracts import SERVICES

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
WORKLOADS = ("Deployment", "StatefulSet")
PARTITIONS_ENV = "MESH_BUDGET_PARTITIONS"


def kind_name(doc: dict[str, Any]) -> str:
    """``Kind/name``: how every error names the object it is about."""
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(selector.get("matchLabels")) and all(labels.get(k) == v for k, v in selector["matchLabels"].items())


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
            errors.append(f"{kind_name(d)}: no topologySpreadConstraints over {', '.join(sorted(missing))}")
        revision = "controller-revision-hash" if d["kind"] == "StatefulSet" else "pod-template-hash"
        for c in pod["spec"].get("topologySpreadConstraints", []):
            if set(c.get("matchLabelKeys", [])) - {revision}:
                errors.append(f"{kind_name(d)}: spread over {c['matchLabelKeys']}: its pods carry {revision}")
        labels = pod["metadata"].get("labels", {})
        if not any(_selects(p["spec"].get("selector", {}), labels) for p in pdbs):
            errors.append(f"{kind_name(d)}: no PodDisruptionBudget selects its pods")
        n = _partitions(d)
        if n > 1 and d["kind"] != "StatefulSet":
            errors.append(f"{kind_name(d)}: {PARTITIONS_ENV}={n} needs the ordinals of a StatefulSet's pods")
        elif n > 1:
            so = scaled.get(("StatefulSet", d["metadata"]["name"]))
            floor = so["spec"].get("minReplicaCount", 0) if so else d["spec"].get("replicas", 1)
            if floor < n:
                errors.append(f"{kind_name(d)}: {floor} pod(s) for {n} partitions (a partition with none is unwatched)")
    return errors


def _trigger_errors(where: str, trigger: dict[str, Any], auths: set[str]) -> list[str]:
    """One trigger of a ScaledObject: its authenticationRef is a TriggerAuthentication of the
    render, and a nats-jetstream trigger's metadata holds what the scaler reads, and only that."""
    errors = []
    ref = (trigger.get("authenticationRef") or {}).get("name")
    if ref is not None and ref not in auths:
        errors.append(f"{where}: authenticationRef {ref!r} is no TriggerAuthentication of this overlay")
    if trigger.get("type") != "nats-jetstream":
        return errors
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
    return errors


def check_scaled_objects(docs: list[dict[str, Any]], durables: dict[str, list[tuple[str, str]]]) -> list[str]:
    """ScaledObjects against the Deployments and durable consumers they scale on.

    ``durables`` maps a service to its (stream, consumer) pairs. A rendering without ScaledObjects
    (KEDA left out) passes. With KEDA on, every workload has a ScaledObject, but one without
    durables that a HorizontalPodAutoscaler scales (the edge: ``check_autoscalers``)."""
    errors = []
    scaled = [d for d in docs if d.get("kind") == "ScaledObject"]
    if not scaled:
        return errors
    deployments = {d["metadata"]["name"] for d in docs if d.get("kind") in WORKLOADS}
    kinds = {d["metadata"]["name"]: d["kind"] for d in docs if d.get("kind") in WORKLOADS}
    auths = {d["metadata"]["name"] for d in docs if d.get("kind") == "TriggerAuthentication"}
    hpas = _hpa_targets(docs)
    targets = set(hpas) - set(durables)  # scaled by an HPA of its own: the edge (no durable to lag)
    for so in scaled:
        spec = so.get("spec", {})
        ref = spec.get("scaleTargetRef", {})
        target = ref.get("name")
        targets.add(target)
        if target not in deployments:
            errors.append(f"{kind_name(so)}: scaleTargetRef {target!r} is no Deployment of this overlay")
        elif ref.get("kind", "Deployment") != kinds[target]:
            errors.append(
                f"{kind_name(so)}: scaleTargetRef names a {ref.get('kind', 'Deployment')}, {target} is a {kinds[target]}"
            )
        seen: list[tuple[str, str]] = []
        for i, trigger in enumerate(spec.get("triggers", [])):
            errors += _trigger_errors(f"{kind_name(so)}: triggers[{i}]", trigger, auths)
            meta = trigger.get("metadata") or {}
            if trigger.get("type") == "nats-jetstream" and "consumer" in meta:
                seen.append((meta.get("stream", ""), meta["consumer"]))
        if target in hpas:
            errors.append(f"{kind_name(so)}: {target} is scaled by HorizontalPodAutoscaler/{hpas[target]} too")
        if target in durables:
            want = durables[target]
            for pair in sorted(set(want) - set(seen)):
                errors.append(f"{kind_name(so)}: no trigger for durable {pair[1]} (stream {pair[0]})")
            for pair in sorted(set(seen) - set(want)):
                errors.append(
                    f"{kind_name(so)}: trigger for {pair[1]} (stream {pair[0]}), which is no durable of {target}"
                )
            if len(seen) != len(set(seen)):
                errors.append(f"{kind_name(so)}: a durable has two triggers")
    for name in sorted(deployments - targets):
        errors.append(f"{kinds[name]}/{name}: no ScaledObject (the overlay has KEDA on)")
    return errors


def _hpa_targets(docs: list[dict[str, Any]]) -> dict[str, str]:
    """Workload name -> the HorizontalPodAutoscaler that scales it."""
    return {
        d["spec"]["scaleTargetRef"].get("name"): d["metadata"]["name"]
        for d in docs
        if d.get("kind") == "HorizontalPodAutoscaler"
    }


def check_autoscalers(docs: list[dict[str, Any]], durables: dict[str, list[tuple[str, str]]]) -> list[str]:
    """HorizontalPodAutoscalers (the edge's: an HTTP service, no durable consumer for KEDA to
    scale it on): each scales a workload of the render, of its kind, with a floor of two replicas
    at least (it is the only thing that sets the count, and a PodDisruptionBudget with one pod
    refuses a drain), and never a service with durables (KEDA's ScaledObjects own those)."""
    errors = []
    kinds = {d["metadata"]["name"]: d["kind"] for d in docs if d.get("kind") in WORKLOADS}
    for hpa in (d for d in docs if d.get("kind") == "HorizontalPodAutoscaler"):
        spec = hpa.get("spec", {})
        ref = spec.get("scaleTargetRef", {})
        target = ref.get("name")
        if target not in kinds:
            errors.append(f"{kind_name(hpa)}: scaleTargetRef {target!r} is no Deployment of this render")
        elif ref.get("kind") != kinds[target]:
            errors.append(f"{kind_name(hpa)}: scaleTargetRef names a {ref.get('kind')}, {target} is a {kinds[target]}")
        if target in durables:
            errors.append(
                f"{kind_name(hpa)}: {target} consumes durables: KEDA scales it on their lag (components/keda)"
            )
        if spec.get("minReplicas", 1) < 2:
            errors.append(
                f"{kind_name(hpa)}: minReplicas {spec.get('minReplicas', 1)} (two at least: a drain needs a second pod)"
            )
    return errors


def check_digests(docs: list[dict[str, Any]]) -> list[str]:
    """Every container image pinned by digest."""
    errors = []
    for d in docs:
        pod = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            if "@sha256:" not in c.get("image", ""):
                errors.append(f"{kind_name(d)}: image {c.get('image')!r} is not pinned by digest")
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
