"""The Helm chart (infra/helm/agentmesh), rendered with the real Helm SDK (helm-python-sdk):
identities from a mesh home reach the right Secrets and nothing else, settings roll the pods,
KEDA keeps the replica count, and a missing identity stops the install with the fix.
`make deploy-check` validates every object of its renders and compares them with kustomize."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mesh_contracts import SERVICES
from mesh_testing.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
deploy_chart = load_script(ROOT / "infra" / "deploy_chart.py")  # what infra/deploy_check.py renders it with
rules = load_script(ROOT / "infra" / "deploy_rules.py")  # the same module test_deploy_check loads


@pytest.fixture(scope="module")
def identity() -> dict:
    return deploy_chart.deep_merge(deploy_chart.identity_values(), {"nats": {"enabled": False}})


def objects(values: dict, revision: int = 1) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in deploy_chart.render_chart(values, revision)}


def test_each_principal_gets_its_own_files_and_nothing_else(identity):
    docs = objects(identity)
    for service in SERVICES:
        files = set(docs[("Secret", f"agentmesh-{service}-identity")]["stringData"])
        expected = {"nats.creds", "signing-key.pem", "data.key"}  # the deployment's data key: every service's
        if service in ("budget", "rag", "tool-executor"):
            expected.add("redis-url")
        if service == "tool-executor":
            expected.add("audit.key")
        assert files == expected, service
        creds = docs[("Secret", f"agentmesh-{service}-identity")]["stringData"]["nats.creds"]
        assert creds == identity["identities"][service]["nats.creds"]
    assert set(docs[("Secret", "agentmesh-admin-identity")]["stringData"]) == {"nats.creds"}
    keeper = docs[("Secret", "agentmesh-keeper-identity")]["stringData"]
    assert keeper == identity["identities"]["keeper"] and set(keeper) == {"nats.creds", "signing-key.pem"}
    bundle = json.loads(docs[("ConfigMap", "agentmesh-trust-bundle")]["data"]["trust-bundle.json"])
    assert bundle == json.loads(identity["trustBundle"])
    # the Redis URLs name the chart's own Redis Service, whose ACL has one user per Redis service
    assert "@redis:6379/" in identity["identities"]["budget"]["redis-url"]
    acl = docs[("Secret", "agentmesh-redis-acl")]["stringData"]["users.acl"]
    assert {line.split()[1] for line in acl.splitlines()} == {"default", "budget", "rag", "tool-executor", "admin"}


@pytest.mark.parametrize("extra", [{}, {"tls": {"enabled": True}}, {"budgetPartitions": {"enabled": True, "count": 2}}])
def test_every_service_reads_the_data_key_from_its_own_secret(identity, extra):
    docs = objects(deploy_chart.deep_merge(identity, extra))
    key = identity["identities"]["planner"]["data.key"]
    for service in SERVICES:
        assert docs[("Secret", f"agentmesh-{service}-identity")]["stringData"]["data.key"] == key, service
        kind = "StatefulSet" if extra.get("budgetPartitions") and service == "budget" else "Deployment"
        pod = docs[(kind, service)]["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["MESH_DATA_KEY_FILE"] == "/var/run/secrets/agentmesh/data.key", service
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["identity"] == "/var/run/secrets/agentmesh", service
        (identity_volume,) = [v for v in pod["volumes"] if v["name"] == "identity"]
        assert identity_volume["secret"]["secretName"] == f"agentmesh-{service}-identity"
        assert {"key": "data.key", "path": "data.key"} in identity_volume["secret"]["items"], service


def test_without_identity_values_the_install_stops_and_says_how(identity):
    values = {k: v for k, v in identity.items() if k != "identities"}
    with pytest.raises(
        Exception, match=r"identities\.\S+ is not set: render the identity values with `python infra/render.py"
    ):
        deploy_chart.render_chart(values)
    # made elsewhere (an external secret store): nothing is required
    bare = {"secrets": {"create": False}, "redis": {"enabled": False}, "nats": {"enabled": False}}
    assert ("Deployment", "worker") in objects(bare)


def test_settings_override_the_base_and_roll_the_pods(identity):
    before = objects(identity)
    after = objects(deploy_chart.deep_merge(identity, {"config": {"MESH_LOG_LEVEL": "DEBUG"}}))
    assert after[("ConfigMap", "agentmesh-config")]["data"]["MESH_LOG_LEVEL"] == "DEBUG"
    assert after[("ConfigMap", "agentmesh-config")]["data"]["MESH_NATS_URL"] == "nats://nats:4222"
    assert before[("ConfigMap", "agentmesh-config")]["data"]["MESH_TENANTS"] == "acme"
    for service in SERVICES:
        old = before[("Deployment", service)]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        new = after[("Deployment", service)]["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
        assert old != new, service


def test_keda_keeps_the_count_unless_one_is_asked_for(identity):
    keda = objects(deploy_chart.deep_merge(identity, {"keda": {"enabled": True}, "replicas": {"budget": 2}}))
    assert "replicas" not in keda[("Deployment", "worker")]["spec"]
    assert keda[("Deployment", "budget")]["spec"]["replicas"] == 2
    scaled = {d["spec"]["scaleTargetRef"]["name"] for k, d in keda.items() if k[0] == "ScaledObject"}
    assert scaled == set(SERVICES)
    assert not any(k[0] == "ScaledObject" for k in objects(identity))


def test_budget_partitions_run_as_a_statefulset_with_a_pod_per_partition_at_least(identity):
    three = objects(deploy_chart.deep_merge(identity, {"budgetPartitions": {"enabled": True, "count": 3}}))
    assert ("Deployment", "budget") not in three
    budget = three[("StatefulSet", "budget")]
    env = {e["name"]: e.get("value") for e in budget["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MESH_BUDGET_PARTITIONS"] == "3"
    assert budget["spec"]["replicas"] == 3  # budget-0, -1, -2: partitions 0, 1, 2
    assert rules.check_deployments([d for d in three.values() if d["metadata"]["name"] != "redis"]) == []  # one pod
    # more pods asked for: second replicas of the first partitions; fewer: still one per partition
    more = objects(
        deploy_chart.deep_merge(
            identity, {"budgetPartitions": {"enabled": True, "count": 3}, "replicas": {"budget": 6}}
        )
    )
    assert more[("StatefulSet", "budget")]["spec"]["replicas"] == 6
    fewer = objects(
        deploy_chart.deep_merge(
            identity, {"budgetPartitions": {"enabled": True, "count": 3}, "replicas": {"budget": 1}}
        )
    )
    assert fewer[("StatefulSet", "budget")]["spec"]["replicas"] == 3
    # KEDA owns the count, between one and two pods per partition, on the StatefulSet
    keda = objects(
        deploy_chart.deep_merge(
            identity, {"keda": {"enabled": True}, "budgetPartitions": {"enabled": True, "count": 3}}
        )
    )
    assert "replicas" not in keda[("StatefulSet", "budget")]["spec"]
    so = keda[("ScaledObject", "budget")]["spec"]
    assert (so["scaleTargetRef"]["kind"], so["minReplicaCount"], so["maxReplicaCount"]) == ("StatefulSet", 3, 6)
    mesh = [d for d in keda.values() if d["metadata"]["name"] != "redis"]  # one pod, neither spread nor scaled
    assert rules.check_scaled_objects(mesh, rules.mesh_durables()) == []
    with pytest.raises(Exception, match=r"budgetPartitions.count is 17: it must be 1 to 16"):
        objects(deploy_chart.deep_merge(identity, {"budgetPartitions": {"enabled": True, "count": 17}}))
    # the other services are untouched
    assert (
        keda[("Deployment", "worker")]
        == objects(deploy_chart.deep_merge(identity, {"keda": {"enabled": True}}))[("Deployment", "worker")]
    )


def test_each_upgrade_provisions_again_with_the_replicas_asked_for(identity):
    first = objects(identity, revision=1)
    second = objects(deploy_chart.deep_merge(identity, {"streamReplicas": 1}), revision=2)
    assert ("Job", "agentmesh-provision-1") in first and ("Job", "agentmesh-provision-2") in second
    args = second[("Job", "agentmesh-provision-2")]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--replicas") + 1] == "1"


def test_images_come_from_the_registry_by_digest_when_given(identity):
    digest = "sha256:" + "a" * 64
    docs = objects(
        deploy_chart.deep_merge(
            identity, {"images": {"registry": "ghcr.io/acme/", "tag": "1.2.3", "digests": {"worker": digest}}}
        )
    )
    assert docs[("Deployment", "worker")]["spec"]["template"]["spec"]["containers"][0]["image"] == (
        f"ghcr.io/acme/agentmesh/worker@{digest}"
    )
    assert (
        docs[("Deployment", "rag")]["spec"]["template"]["spec"]["containers"][0]["image"]
        == "ghcr.io/acme/agentmesh/rag:1.2.3"
    )


def test_the_nats_values_are_the_kustomize_paths_own():
    chart_values = yaml.safe_load((deploy_chart.CHART / "values.yaml").read_text())
    nats = dict(chart_values["nats"])
    assert nats.pop("enabled") is True and nats.pop("fullnameOverride") == "nats"  # MESH_NATS_URL: nats://nats:4222
    assert nats == yaml.safe_load((ROOT / "infra" / "nats" / "helm-values.yaml").read_text())


def test_the_identity_values_file_is_private(tmp_path):
    home = tmp_path / "home"
    subprocess.run(
        [sys.executable, "-m", "meshctl", "--home", str(home), "init", "--tenants", "acme"],
        check=True,
        capture_output=True,
    )
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "infra" / "render.py"),
            "--home",
            str(home),
            "helm",
            "--redis-host",
            "redis.prod.internal",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    out = home / "helm" / "identity-values.yaml"
    assert done.stdout.strip() == f"wrote {out}"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    values = json.loads(out.read_text())
    assert "@redis.prod.internal:6379/" in values["identities"]["rag"]["redis-url"]
    assert "auth.conf" in values["nats"]["configMap"]["merge"]["data"]
    assert "PRIVATE" not in done.stdout + done.stderr  # nothing secret printed


def test_the_edge_gets_its_creds_the_tenants_keys_and_its_identity_provider(identity):
    assert not [k for k in objects(identity) if "edge" in k[1]], "off by default: it needs an identity provider"
    identity = deploy_chart.deep_merge(identity, {"edge": {"enabled": True}})
    docs = objects(identity)
    assert docs[("Secret", "agentmesh-edge-identity")]["stringData"] == {
        "nats.creds": identity["identities"]["edge"]["nats.creds"]
    }  # no signing key of its own: it signs as the tenants
    tenants = docs[("Secret", "agentmesh-edge-tenants")]["stringData"]
    assert tenants == {"client.acme.pem": identity["edgeTenants"]["acme"]["client.acme.pem"],
                       "data.acme.key": identity["edgeTenants"]["acme"]["data.acme.key"]}  # fmt: skip
    pod = docs[("Deployment", "edge")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["tenants"] == env["MESH_EDGE_KEYS_DIR"] and env["MESH_EDGE_HOST"] == "0.0.0.0"  # noqa: S104 - a container: probes and the Service
    volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in pod["volumes"]}
    assert (volumes["identity"], volumes["tenants"]) == ("agentmesh-edge-identity", "agentmesh-edge-tenants")
    assert "replicas" not in docs[("Deployment", "edge")]["spec"]  # the HPA owns the count
    assert (docs[("HorizontalPodAutoscaler", "edge")]["spec"]["minReplicas"], docs[("Service", "edge")]["spec"]["ports"][0]["port"]) == (2, 8088)  # fmt: skip

    oidc = {"issuer": "https://login.example.invalid", "jwksUrl": "https://login.example.invalid/jwks"}
    some = objects(deploy_chart.deep_merge(identity, {"edge": {"oidc": oidc, "minReplicas": 3}, "config": {"MESH_EDGE_AUDIENCE": "web"}}))  # fmt: skip
    config = some[("ConfigMap", "agentmesh-config")]["data"]
    assert (config["MESH_EDGE_ISSUER"], config["MESH_EDGE_JWKS_URL"], config["MESH_EDGE_AUDIENCE"]) == (
        oidc["issuer"], oidc["jwksUrl"], "web"
    )  # fmt: skip
    assert some[("HorizontalPodAutoscaler", "edge")]["spec"]["minReplicas"] == 3
    with pytest.raises(Exception, match=r"edge.tenants names globex, whose keys are not in edgeTenants"):
        objects(deploy_chart.deep_merge(identity, {"edge": {"tenants": ["globex"]}}))

    off = objects(deploy_chart.deep_merge(identity, {"edge": {"enabled": False}}))
    assert not [k for k in off if "edge" in k[1]], "edge.enabled=false leaves none of its objects"
