"""infra/deploy_check.py (`make deploy-check`) reports what is wrong in a manifest, and passes ours.

The checker's own functions (in deploy_schemas.py and deploy_rules.py, beside it), on documents
made here and on the committed files (no kubectl, no cluster): a ScaledObject against KEDA's
vendored CRD schema and against the mesh's durables, a Deployment against the Kubernetes schemas
(kubernetes-validate, strict), a Certificate against cert-manager's, NATS chart values against
the pinned chart's values.yaml. The tools come from infra/deploy-requirements.txt, which
`make test` and `make test-unit` install first.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh_testing.scripts import load_script

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"


dc = load_script(ROOT / "infra" / "deploy_check.py")
schemas = load_script(ROOT / "infra" / "deploy_schemas.py")  # the modules it imports, beside it
rules = load_script(ROOT / "infra" / "deploy_rules.py")


@pytest.fixture(scope="module")
def crds() -> Any:
    return schemas.CrdSchemas.load()


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_name(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return copy.deepcopy(next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name))


@pytest.fixture(scope="module")
def keda_docs() -> list[dict[str, Any]]:
    keda = K8S / "components" / "keda"
    return _docs(keda / "scaledobjects.yaml") + _docs(keda / "trigger-authentication.yaml")


@pytest.fixture(scope="module")
def base_docs() -> list[dict[str, Any]]:
    return [d for p in sorted((K8S / "base").glob("*.yaml")) if p.name != "kustomization.yaml" for d in _docs(p)]


def test_the_committed_manifests_pass(crds: Any, keda_docs: list[dict[str, Any]], base_docs: list[dict[str, Any]]):
    for doc in keda_docs + base_docs + _docs(K8S / "components" / "tls" / "certificates.yaml"):
        assert schemas.validate_object(doc, crds) == [], rules.kind_name(doc)
    docs = base_docs + keda_docs
    assert rules.check_deployments(docs) == []
    assert rules.check_scaled_objects(docs, rules.mesh_durables()) == []


def test_a_scaled_object_with_a_misspelled_trigger_field_is_reported(crds: Any, keda_docs: list[dict[str, Any]]):
    so = _by_name(keda_docs, "ScaledObject", "worker")
    trigger = so["spec"]["triggers"][0]
    trigger["metdata"] = trigger.pop("metadata")
    so["spec"]["minReplicas"] = 2  # minReplicaCount, misspelled
    errors = schemas.validate_crd_object(so, crds)
    assert any("spec.triggers.0" in e and "'metadata' is a required property" in e for e in errors), errors
    assert any("spec.triggers.0" in e and "'metdata' was unexpected" in e for e in errors), errors
    assert any("'minReplicas' was unexpected" in e for e in errors), errors


def test_a_scaled_object_of_the_wrong_type_is_reported(crds: Any, keda_docs: list[dict[str, Any]]):
    so = _by_name(keda_docs, "ScaledObject", "planner")
    so["spec"]["maxReplicaCount"] = "five"
    del so["spec"]["scaleTargetRef"]
    errors = schemas.validate_crd_object(so, crds)
    assert any(e.startswith("spec.maxReplicaCount:") and "'five' is not of type 'integer'" in e for e in errors)
    assert any("'scaleTargetRef' is a required property" in e for e in errors), errors


def test_a_trigger_missing_or_misnaming_a_durable_is_reported(
    keda_docs: list[dict[str, Any]], base_docs: list[dict[str, Any]]
):
    docs = copy.deepcopy(base_docs + keda_docs)
    rag = _by_name(docs, "ScaledObject", "rag")
    docs = [d for d in docs if not (d["kind"] == "ScaledObject" and d["metadata"]["name"] == "rag")] + [rag]
    ingest = next(t for t in rag["spec"]["triggers"] if t["metadata"]["consumer"] == "rag--rag-ingest")
    rag["spec"]["triggers"].remove(ingest)  # the durable left without a trigger
    rag["spec"]["triggers"][0]["metadata"]["consmer"] = rag["spec"]["triggers"][0]["metadata"].pop("consumer")
    rag["spec"]["triggers"][0]["metadata"]["lagThreshold"] = "eight"
    errors = rules.check_scaled_objects(docs, rules.mesh_durables())
    assert "ScaledObject/rag: no trigger for durable rag--rag-ingest (stream RAG)" in errors, errors
    assert any("triggers[0]: metadata keys the nats-jetstream scaler does not read: ['consmer']" in e for e in errors)
    assert any("triggers[0]: metadata lacks ['consumer']" in e for e in errors), errors
    assert any("lagThreshold 'eight' is not a whole number" in e for e in errors), errors


def test_a_scaled_object_without_its_deployment_or_authentication_is_reported(keda_docs: list[dict[str, Any]]):
    docs = [d for d in copy.deepcopy(keda_docs) if d["kind"] == "ScaledObject"]  # no Deployment, no TriggerAuth
    errors = rules.check_scaled_objects(docs, rules.mesh_durables())
    assert any("ScaledObject/budget: scaleTargetRef 'budget' is no Deployment" in e for e in errors), errors
    assert any("authenticationRef 'agentmesh-nats-monitoring' is no TriggerAuthentication" in e for e in errors)


def test_a_deployment_with_a_wrong_type_or_unknown_field_is_reported(base_docs: list[dict[str, Any]]):
    worker = _by_name(base_docs, "Deployment", "worker")
    worker["spec"]["replicas"] = "two"
    worker["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Always"
    worker["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    errors = schemas.validate_core_object(worker, ["1.37.0"])
    assert errors and all(e.startswith("Kubernetes 1.37.0:") for e in errors), errors
    assert any("'two' is not of type 'integer'" in e for e in errors), errors
    worker["spec"]["replicas"] = 2  # kubernetes-validate stops at the first error: now the next one
    errors = schemas.validate_core_object(worker, ["1.37.0"])
    assert any("'imagePulPolicy' was unexpected" in e for e in errors), errors


def test_a_deployment_without_spread_or_disruption_budget_is_reported(base_docs: list[dict[str, Any]]):
    docs = [
        d
        for d in copy.deepcopy(base_docs)
        if not (d["kind"] == "PodDisruptionBudget" and d["metadata"]["name"] == "rag")
    ]
    worker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "worker")
    worker["spec"]["template"]["spec"]["topologySpreadConstraints"].pop()  # the zone one
    errors = rules.check_deployments(docs)
    assert "Deployment/rag: no PodDisruptionBudget selects its pods" in errors, errors
    assert "Deployment/worker: no topologySpreadConstraints over topology.kubernetes.io/zone" in errors, errors


def test_a_certificate_with_a_misspelled_field_is_reported(crds: Any):
    cert = _by_name(_docs(K8S / "components" / "tls" / "certificates.yaml"), "Certificate", "nats-server-tls")
    cert["spec"]["dnsName"] = cert["spec"].pop("dnsNames")
    errors = schemas.validate_object(cert, crds)
    assert any("'dnsName' was unexpected" in e for e in errors), errors


def test_images_not_pinned_by_digest_are_reported(base_docs: list[dict[str, Any]]):
    errors = rules.check_digests(base_docs)
    assert "Deployment/worker: image 'agentmesh/worker' is not pinned by digest" in errors, errors
    pinned = copy.deepcopy(_by_name(base_docs, "Deployment", "worker"))
    pinned["spec"]["template"]["spec"]["containers"][0]["image"] = "agentmesh/worker@sha256:" + "0" * 64
    assert rules.check_digests([pinned]) == []


def test_nats_values_the_pinned_chart_does_not_have_are_reported():
    chart = yaml.safe_load((ROOT / "infra" / "nats" / f"chart-{dc.NATS_CHART_VERSION}-values.yaml").read_text())
    ours = yaml.safe_load((ROOT / "infra" / "nats" / "helm-values.yaml").read_text())
    assert rules.chart_value_errors(ours, chart) == []
    ours["config"]["jetstrem"] = ours["config"].pop("jetstream")
    ours["container"]["merge"]["anything"] = True  # merge is free-form
    assert rules.chart_value_errors(ours, chart) == ["config.jetstrem: not a value of the chart"]


def test_strict_schema_closes_objects_but_keeps_open_maps():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "nullable": True},
            "m": {"type": "object", "additionalProperties": {"type": "string"}},
            "p": {"type": "object", "properties": {"x": {}}, "x-kubernetes-preserve-unknown-fields": True},
        },
    }
    strict = schemas.strict_schema(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["a"]["type"] == ["string", "null"]
    assert strict["properties"]["m"]["additionalProperties"] == {"type": "string"}
    assert "additionalProperties" not in strict["properties"]["p"]
    assert "additionalProperties" not in schema  # the input is left as it was


def test_a_partitioned_budget_with_too_few_pods_or_no_ordinals_is_reported(base_docs: list[dict[str, Any]]):
    docs = copy.deepcopy(base_docs)
    budget = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "budget")
    budget["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": "MESH_BUDGET_PARTITIONS", "value": "2"})
    assert (
        "Deployment/budget: MESH_BUDGET_PARTITIONS=2 needs the ordinals of a StatefulSet's pods"
        in rules.check_deployments(docs)
    )
    budget["kind"], budget["spec"]["replicas"] = "StatefulSet", 1
    errors = rules.check_deployments(docs)
    assert "StatefulSet/budget: 1 pod(s) for 2 partitions (a partition with none is unwatched)" in errors, errors
    assert any("StatefulSet/budget: spread over ['pod-template-hash']" in e for e in errors), errors


def test_the_edge_is_scaled_by_its_own_autoscaler_and_nothing_else(
    keda_docs: list[dict[str, Any]], base_docs: list[dict[str, Any]]
):
    docs = copy.deepcopy(base_docs + keda_docs)
    durables = rules.mesh_durables()
    assert rules.check_autoscalers(docs, durables) == []
    hpa = _by_name(docs, "HorizontalPodAutoscaler", "edge")
    others = [d for d in docs if d["kind"] != "HorizontalPodAutoscaler"]
    # KEDA on and no autoscaler: the edge is a workload nothing scales
    assert "Deployment/edge: no ScaledObject (the overlay has KEDA on)" in rules.check_scaled_objects(others, durables)
    hpa["spec"]["minReplicas"] = 1
    hpa["spec"]["scaleTargetRef"]["name"] = "worker"  # a service with durables: KEDA's
    errors = rules.check_autoscalers([*others, hpa], durables)
    assert any("worker consumes durables" in e for e in errors), errors
    assert any("minReplicas 1 (two at least" in e for e in errors), errors
    assert any(
        "worker is scaled by HorizontalPodAutoscaler/edge too" in e
        for e in rules.check_scaled_objects([*others, hpa], durables)
    )
    hpa["spec"]["scaleTargetRef"]["name"] = "frontend"
    assert any(
        "scaleTargetRef 'frontend' is no Deployment" in e for e in rules.check_autoscalers([*others, hpa], durables)
    )
