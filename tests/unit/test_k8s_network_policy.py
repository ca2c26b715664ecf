"""The NetworkPolicy component against the Deployments it governs.

A pod that mounts a Redis URL must be admitted to Redis by the policy, and no other pod: the
policy once admitted only the budget, while rag and the tool-executor use Redis too (their
cache and rate limits failed in a cluster with the component on). Selectors are evaluated as
Kubernetes does (matchLabels and matchExpressions, ANDed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mesh_contracts import SERVICES
from meshctl.local import REDIS_SERVICES

pytestmark = pytest.mark.unit

K8S = Path(__file__).resolve().parents[2] / "infra" / "k8s"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _deployments() -> dict[str, dict]:
    out = {}
    for path in sorted((K8S / "base").glob("*.yaml")):
        for doc in _docs(path):
            if doc.get("kind") == "Deployment":
                out[doc["metadata"]["name"]] = doc
    return out


def _pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def _env(deployment: dict) -> set[str]:
    return {e["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def _egress_ports(policy: dict, to_label: tuple[str, str]) -> set[int]:
    """The TCP ports ``policy`` lets its pods reach on pods labelled ``to_label``."""
    ports: set[int] = set()
    for rule in policy["spec"].get("egress", []):
        if any(p.get("podSelector", {}).get("matchLabels", {}).get(to_label[0]) == to_label[1] for p in rule["to"]):
            ports |= {p["port"] for p in rule.get("ports", []) if p.get("protocol", "TCP") == "TCP"}
    return ports


def _admitted(policies: list[dict], labels: dict[str, str], to_label: tuple[str, str], port: int) -> bool:
    return any(selects(p["spec"]["podSelector"], labels) and port in _egress_ports(p, to_label) for p in policies)


def test_every_pod_that_uses_redis_may_reach_it_and_no_other_may():
    policies = [
        d for d in _docs(K8S / "components" / "network-policy" / "agentmesh.yaml") if d["kind"] == "NetworkPolicy"
    ]
    deployments = _deployments()
    assert set(deployments) == {*SERVICES, "edge", "a2a"}  # the six services and the gateways (HTTP, A2A)
    users = {name for name, d in deployments.items() if "MESH_REDIS_URL_FILE" in _env(d)}
    assert users == {"budget", "rag", "tool-executor"}, "a new Redis user: add it to the policy and this test"
    # and the local mesh (meshctl up, tests, images) gives a Redis user to these and no other
    assert users == set(REDIS_SERVICES)
    for name, d in deployments.items():
        labels = _pod_labels(d)
        assert _admitted(policies, labels, ("app.kubernetes.io/name", "redis"), 6379) == (name in users), name
        assert _admitted(policies, labels, ("app.kubernetes.io/name", "nats"), 4222), f"{name} must reach NATS"


def test_the_selector_evaluation_itself():
    sel = {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "n", "operator": "In", "values": ["x", "y"]}]}
    assert selects(sel, {"a": "1", "n": "x"})
    assert not selects(sel, {"a": "1", "n": "z"})
    assert not selects(sel, {"a": "2", "n": "x"})
    assert not selects(sel, {"a": "1"})
    assert selects({"matchExpressions": [{"key": "n", "operator": "DoesNotExist"}]}, {"a": "1"})
