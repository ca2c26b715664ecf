"""A hand-in whose door never answers (its keeper killed holding the request) is tried again
after a second, not after five: ``meshctl.client.DOOR_TIMEOUTS_S``."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import nats
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from mesh_contracts.v1 import TaskSubmitted
from mesh_identity import Signer
from meshctl.client import DOOR_TIMEOUTS_S, TenantClient


class Door:
    """Answers the ``answer_on``-th request, lets the ones before it time out (as a dead keeper does)."""

    def __init__(self, answer_on: int) -> None:
        self.answer_on = answer_on
        self.waits: list[float] = []
        self.bodies: list[bytes] = []

    async def request(self, subject: str, body: bytes, *, headers: dict[str, str], timeout: float) -> Any:
        self.waits.append(timeout)
        self.bodies.append(body)
        if len(self.waits) < self.answer_on:
            raise nats.errors.TimeoutError
        return SimpleNamespace(data=json.dumps({"stream": "TASK", "seq": 7, "duplicate": True}).encode())


def _client(door: Door) -> TenantClient:
    client = TenantClient.__new__(TenantClient)
    client.tenant, client.signer, client.nc = "acme", Signer("client.acme", Ed25519PrivateKey.generate()), door  # type: ignore[assignment]
    return client


async def test_an_unanswered_hand_in_is_tried_again_after_a_second_then_waits_longer():
    door = Door(answer_on=4)
    stored = await _client(door).publish(TaskSubmitted(tenant="acme", task_id="t-1", goal="g"), within_s=60)
    assert door.waits == [1.0, 2.0, 5.0, 5.0] and DOOR_TIMEOUTS_S == (1.0, 2.0, 5.0)
    assert len(set(door.bodies)) == 1, "every try hands in the same message (its id makes a landed one count once)"
    assert stored.seq == 7 and stored.duplicate
