"""A tenant's client (and the edge, which reads through it) judges a message read back from its
stream as of when it was stored: a task's outcome read an hour after it ended still verifies,
while the same bytes delivered live an hour late do not."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from mesh_contracts.v1 import TaskCompleted
from mesh_identity import IdentityError, Verifier
from mesh_kit import envelope as env
from meshctl.client import TenantClient, stored_at

pytestmark = pytest.mark.unit


def _client(keys, tmp_path) -> TenantClient:
    client = object.__new__(TenantClient)  # no connection: only believing is under test
    bundle = tmp_path / "trust-bundle.json"
    bundle.write_text(keys.bundle.dump())
    client.verifier, client.trust_bundle = Verifier(keys.bundle), bundle
    return client


def test_an_old_outcome_read_back_verifies_as_of_when_it_was_stored(keys, tmp_path) -> None:
    hour_ago = time.time() - 3600
    outcome = TaskCompleted(tenant="acme", task_id="t1", answer="42")
    body, mid = outcome.to_bytes(), "task.completed:acme:t1:completed"
    token = keys.signer("planner").token(tenant="acme", msg_type=outcome.type, body=body, msg_id=mid, now=hour_ago)
    headers = {env.IDENTITY: token, env.MSG_ID: mid, env.SCHEMA: outcome.schema_id()}
    stamp = datetime.fromtimestamp(hour_ago + 0.25, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"  # nanoseconds
    client = _client(keys, tmp_path)
    believed = client._believe(outcome.subject(), body, {**headers, "Nats-Time-Stamp": stamp})
    assert isinstance(believed, TaskCompleted) and believed.answer == "42"
    with pytest.raises(IdentityError, match="expired"):
        client._believe(outcome.subject(), body, headers)  # delivered live an hour late: not believed
    assert stored_at({"Nats-Time-Stamp": "not a time"}) is None and stored_at(None) is None
