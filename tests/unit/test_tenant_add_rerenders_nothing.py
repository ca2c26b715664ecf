"""Adding a tenant changes nothing a deployment was rendered from (issue 47, item 4): the Helm
identity values, the NATS operator/resolver include and the compose files are byte for byte the
same after ``meshctl tenant add``'s minting, so no chart re-render and no rollout is needed. The
tenant's own files appear in the home, and only there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from meshctl.identity import Identities, _nats_claims
from meshctl.policy import client_permissions
from meshctl.registry import Minter

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def render(home: Path, *what: str) -> dict[str, bytes]:
    done = subprocess.run([sys.executable, str(ROOT / "infra" / "render.py"), "--home", str(home), *what],
                          check=True, capture_output=True, text=True)  # fmt: skip
    paths = [Path(line.split("wrote ", 1)[1]) for line in done.stdout.splitlines() if line.startswith("wrote ")]
    out = {}
    for p in paths:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                out[str(f.relative_to(home))] = f.read_bytes()
    return out


def without_redis_passwords(rendered: dict[str, bytes]) -> dict[str, object]:
    """The helm values as JSON, less what every render makes afresh (the Redis users' passwords)."""
    values = json.loads(rendered["helm/identity-values.yaml"])
    values.pop("redis")
    for files in values["identities"].values():
        files.pop("redis-url", None)
    return values


def test_minting_a_tenant_rewrites_nothing_a_deployment_was_rendered_from(tmp_path):
    home = tmp_path / "home"
    subprocess.run([sys.executable, "-m", "meshctl", "--home", str(home), "init", "--tenants", "acme"],
                   check=True, capture_output=True)  # fmt: skip
    helm, auth = without_redis_passwords(render(home, "helm")), render(home, "nats-auth")
    ids = Identities(home)
    bundle = ids.trust_bundle.read_bytes()

    ident = Minter(ids).mint("newco")

    assert without_redis_passwords(render(home, "helm")) == helm, "the chart's values are the same"
    assert render(home, "nats-auth") == auth, "the servers' operator and accounts are the same"
    assert ids.trust_bundle.read_bytes() == bundle, "the trust bundle is not rewritten"
    assert ids.tenants() == ["acme"], "the tenants minted with the mesh (MESH_TENANTS) are unchanged"
    for path in (ids.creds("client.newco"), ids.signing_key("client.newco"), ids.tenant_data_key("newco"),
                 ids.auditor_key("newco")):  # fmt: skip
        assert path.exists() and path.stat().st_mode & 0o777 == 0o600, path
    pub, sub, _, expires = _nats_claims(ids.creds("client.newco"))
    wanted = client_permissions("newco")
    assert (pub, sub, expires) == (wanted.pub, wanted.sub, None), "the user JWT carries the tenant's permissions"
    assert ident.client_key.startswith("-----BEGIN PUBLIC KEY-----") and ident.data_key
    creds = ids.creds("client.newco").read_bytes()
    again = Minter(ids).mint("newco")  # an add that stopped before its record: run again, nothing made twice
    assert (again.client_key, again.auditor_key) == (ident.client_key, ident.auditor_key)
    assert ids.creds("client.newco").read_bytes() == creds
