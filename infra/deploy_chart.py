"""The Helm chart (infra/helm/agentmesh) as `make deploy-check` renders it: the values variants it
renders, the identity values a fresh mesh home gives it, and the objects each render must hold:
those of the matching kustomize render (a gateway's left out with <gateway>.enabled=false), plus the
chart's own (Secrets, trust bundle, Redis).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from mesh_contracts import SERVICES

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "infra" / "helm" / "agentmesh"
# The chart's own objects, beside those of the kustomize sources.
EDGE = "edge"  # the HTTP gateway: in no stream, so not a SERVICE; off with edge.enabled=false
A2A = "a2a"  # the A2A gateway, likewise; off with a2a.enabled=false
GATEWAYS = (EDGE, A2A)
CHART_SECRETS = {("Secret", f"agentmesh-{p}-identity") for p in (*SERVICES, "admin", "keeper")} | {
    ("ConfigMap", "agentmesh-trust-bundle")
}
GATEWAY_SECRETS = {g: {("Secret", f"agentmesh-{g}-identity"), ("Secret", f"agentmesh-{g}-tenants")} for g in GATEWAYS}
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
                    "digests": {n: "sha256:" + "1" * 64 for n in (*SERVICES, *GATEWAYS, "meshctl")}},
         "redis": {"image": "redis@sha256:" + "2" * 64},
         "replicas": {"planner": 2, "budget": 2},
         "resources": {"worker": {"requests": {"cpu": "1", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}},
         "model": {"config": {"models.yaml": "providers: {}\n"}, "keys": {"openai.key": "not-a-key"}},
         "edge": {"enabled": True, "minReplicas": 3, "maxReplicas": 9, "tenants": ["acme"],
                  "oidc": {"issuer": "https://login.example.invalid", "jwksUrl": "https://login.example.invalid/jwks"}},
         "a2a": {"enabled": True, "minReplicas": 2, "maxReplicas": 4, "tenants": ["acme"],
                 "publicUrl": "https://agents.example.invalid",
                 "oidc": {"issuer": "https://login.example.invalid", "jwksUrl": "https://login.example.invalid/jwks"}}},
        ("keda", "network-policy", "tls"),
    ),
    "edge on": ({"edge": {"enabled": True}}, ("network-policy", "tls")),
    "a2a on": ({"a2a": {"enabled": True}}, ("network-policy", "tls")),
    "budget partitions": ({"budgetPartitions": {"enabled": True, "count": 3}}, ("network-policy", "tls", "budget-partitions")),
    "budget partitions, KEDA": (
        {"keda": {"enabled": True}, "budgetPartitions": {"enabled": True, "count": 3}, "replicas": {"budget": 5}},
        ("keda", "network-policy", "tls", "budget-partitions"),
    ),
}  # fmt: skip


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in (a copy): maps merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def identity_values() -> dict[str, Any]:
    """What `infra/render.py helm` writes, for a mesh home minted here and thrown away."""
    with tempfile.TemporaryDirectory(prefix="agentmesh-deploy-check-") as home:
        for cmd in (
            [sys.executable, "-m", "meshctl", "--home", home, "init", "--tenants", "acme"],
            [sys.executable, str(ROOT / "infra" / "render.py"), "--home", home, "helm"],
        ):
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd[1:4])}: {done.stderr.strip()}")
        return json.loads((Path(home) / "helm" / "identity-values.yaml").read_text())


def render_chart(values: dict[str, Any], revision: int = 1) -> list[dict[str, Any]]:
    import helm_python as helm

    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values, name="agentmesh", namespace="agentmesh", revision=revision, is_install=True)
    return [d for name, text in sorted(out.items()) if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d]


def _kustomize_components(components: tuple[str, ...], gateways: tuple[str, ...] = GATEWAYS) -> set[tuple[str, str]]:
    """(kind, name) of the base rendered with ``components``, as infra/helm/chart.py renders it;
    without the objects of a gateway (labelled with its name) not in ``gateways``."""
    if str(CHART.parent) not in sys.path:
        sys.path.insert(0, str(CHART.parent))
    import chart as gen  # infra/helm/chart.py: a script beside the chart, not a package

    return {
        (d["kind"], gen.unhash(d)["metadata"]["name"])
        for d in gen.render(components)
        if d["kind"] != "Namespace"
        and d["metadata"].get("labels", {}).get("app.kubernetes.io/name") not in set(GATEWAYS) - set(gateways)
    }


def expected_objects(values: dict[str, Any], components: tuple[str, ...]) -> set[tuple[str, str]]:
    """(kind, name) of what a render with ``values`` must hold: the kustomize render with
    ``components`` (its provisioning Job named for the release's revision 1), and the chart's own
    objects that ``values`` turn on."""
    # a gateway is off by default: it needs an identity provider
    on = tuple(g for g in GATEWAYS if values.get(g, {}).get("enabled", False))
    want = {("Job", "agentmesh-provision-1") if k == ("Job", "agentmesh-provision") else k
            for k in _kustomize_components(components, on)}  # fmt: skip
    if values.get("secrets", {}).get("create", True):
        want |= CHART_SECRETS
        for gateway in on:
            want |= GATEWAY_SECRETS[gateway]
    if values.get("redis", {}).get("enabled", True):
        want |= CHART_REDIS | ({("NetworkPolicy", "redis")} if "network-policy" in components else set())
    if values.get("model", {}).get("config"):
        want |= {("ConfigMap", "agentmesh-model-config"), ("Secret", "agentmesh-model-keys")}
    return want
