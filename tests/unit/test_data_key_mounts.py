"""The deployment's data key (``secrets/data.key`` of a mesh home) reaches every one of the six
services in every way the repository runs them: as processes (`meshctl up`), as containers of
their images (``MESH_TEST_INFRA=images``), under docker compose and from the kustomize base (the
Helm chart renders of it: tests/unit/test_helm_chart.py). It wraps each tenant's data key; tenant
content at rest is sealed with the tenant's key (issue 42)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from mesh_contracts import SERVICES
from mesh_testing import service_images
from meshctl import local
from meshctl.identity import Identities

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
KEY_IN = "/var/run/secrets/agentmesh/data.key"  # where every Deployment mounts it


@pytest.fixture
def home(tmp_path) -> Identities:
    """A mesh home with only a data key (the rest of an identity does not matter here)."""
    ids = Identities(tmp_path / "home")
    ids.data_key.parent.mkdir(parents=True)
    ids.data_key.write_text("ab" * 32)
    ids.data_key.chmod(0o600)
    return ids


def test_meshctl_up_hands_every_service_the_homes_data_key_never_the_operators(home, tmp_path, monkeypatch):
    monkeypatch.setenv("MESH_DATA_KEY_FILE", "/operator/stale/data.key")
    for service in SERVICES:
        env = local.service_env(home, service, "nats://127.0.0.1:1", 9999, {})
        assert env["MESH_DATA_KEY_FILE"] == str(home.data_key), service
    # a home without one: the variable is unset, not the operator's stale path
    bare = Identities(tmp_path / "bare")
    for service in SERVICES:
        assert "MESH_DATA_KEY_FILE" not in local.service_env(bare, service, "nats://127.0.0.1:1", 9999, {}), service


def test_every_container_holds_the_data_key_where_its_environment_says(home):
    for service in SERVICES:
        secrets, _ = service_images.stage_identity(home, service)
        staged = secrets / "data.key"
        assert staged.read_text() == home.data_key.read_text(), service
        assert stat.S_IMODE(staged.stat().st_mode) == 0o400, service
        env = service_images.container_env(home, service, "nats://127.0.0.1:1", 9999, {})
        assert env["MESH_DATA_KEY_FILE"] == f"{service_images.SECRETS_IN}/data.key" == KEY_IN, service


def test_compose_mounts_the_data_key_into_every_service_read_only():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for service in SERVICES:
        spec = compose["services"][service]
        assert spec["environment"]["MESH_DATA_KEY_FILE"] == KEY_IN, service
        assert f"${{MESH_HOME:-.mesh}}/secrets/data.key:{KEY_IN}:ro" in spec["volumes"], service


def test_every_deployment_of_the_kustomize_base_reads_the_data_key_from_its_own_secret():
    for service in SERVICES:
        docs = yaml.safe_load_all((ROOT / "infra" / "k8s" / "base" / f"{service}.yaml").read_text())
        (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
        pod = deployment["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["MESH_DATA_KEY_FILE"] == KEY_IN, service
        (identity,) = [v for v in pod["volumes"] if v["name"] == "identity"]
        assert identity["secret"]["secretName"] == f"agentmesh-{service}-identity"
        assert {"key": "data.key", "path": "data.key"} in identity["secret"]["items"], service
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["identity"] == str(Path(KEY_IN).parent), service
