"""`meshctl approvers`: bad input is one line before anything is touched, and a person who
approves survives `meshctl init` run again (e.g. to add a tenant). Adding, deciding and
removing through a running mesh: tests/scenarios/test_tools_and_rag_scenarios.py."""

from __future__ import annotations

import json

import pytest

from mesh_identity import Principal, TrustBundle, new_signing_key, private_pem
from meshctl.cli import main
from meshctl.identity import Identities

pytestmark = pytest.mark.unit
NOWHERE = "nats://127.0.0.1:1"  # never reached: every case below fails before connecting


@pytest.fixture
def home(tmp_path):
    ids = Identities(tmp_path / "home")
    ids.mint(["acme", "globex"])
    return ids


def run(ids, capsys, *args):
    code = main(["--home", str(ids.home), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["add", "Alice!", "--tenant", "acme"], "approver name 'Alice!': 1-32 of a-z, 0-9"),
        (["add", "alice", "--tenant", "initech"], "unknown tenant 'initech' (tenants: acme, globex)"),
        (["add", "alice"], "approvers add needs a NAME and --tenant"),
        (["remove", "alice", "--tenant", "acme"], "approver.acme.alice is not an approver"),
    ],
)
def test_bad_input_is_one_line(home, capsys, args, message):
    code, out, err = run(home, capsys, "approvers", *args, "--nats-url", NOWHERE)
    lines = err.strip().splitlines()
    assert code != 0 and out == "" and len(lines) == 1 and lines[0].startswith(f"meshctl: {message}"), err


def test_deciding_as_someone_the_mesh_does_not_trust_is_one_line(home, capsys):
    code, _, err = run(home, capsys, "approve", "ap-1", "--as", "approver.acme.mallory", "--nats-url", NOWHERE)
    assert code != 0 and err.strip() == (
        "meshctl: approver.acme.mallory is not an approver of this mesh (list them with: meshctl approvers list)"
    )


def test_a_person_is_listed_and_kept_when_init_runs_again(home, capsys):
    assert run(home, capsys, "approvers", "list")[1].startswith("no approvers")
    # what `approvers add` does, without a mesh to publish to
    key = new_signing_key()
    home.signing_key("approver.acme.alice").write_bytes(private_pem(key))
    bundle = TrustBundle.from_file(home.trust_bundle)
    alice = Principal("approver.acme.alice", "approver", "acme", key.public_key())
    home.trust_bundle.write_text(TrustBundle({**bundle.principals, alice.name: alice}, bundle.auditors, 7).dump())

    home.mint(["acme", "globex", "initech"])  # a tenant added later
    after = TrustBundle.from_file(home.trust_bundle)
    assert after.principals["approver.acme.alice"].tenant == "acme"
    assert "client.initech" in after.principals and after.revision >= 7
    code, out, _ = run(home, capsys, "approvers", "list", "--json")
    assert code == 0 and json.loads(out) == [{"principal": "approver.acme.alice", "tenant": "acme"}]
    assert run(home, capsys, "approvers", "list", "--tenant", "globex")[1].startswith("no approvers for globex")
    # a retired key (removed) is not brought back
    home.signing_key("approver.acme.alice").rename(home.signing_key("approver.acme.alice").with_suffix(".pem.revoked"))
    home.mint(["acme"])
    assert "approver.acme.alice" not in TrustBundle.from_file(home.trust_bundle).principals
