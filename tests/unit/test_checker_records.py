"""The checker resolves citations only against retrieval records rag signed for this very task.

The records travel in the check request (the checker holds no right to read the RAG stream);
whoever handed them on (worker, planner) cannot add, alter or borrow one unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_checker.service import Checker
from mesh_contracts.v1 import CheckRequested, RetrievalCompleted, RetrievalHit, SignedRecord, StepResult
from mesh_host import Mesh
from mesh_kit.settings import ServiceSettings

pytestmark = pytest.mark.unit

HIT = RetrievalHit(doc_id="a.md", version="v1", chunk_id="3", chunk_hash="h3", score=1.0, text="The sky is blue.")
STARTED = 1_900_000_000.0


def record(keys, *, by: str = "rag", tenant: str = "acme", task: str = "t1", at: float = STARTED + 5, hits=(HIT,),
           tamper: bool = False) -> SignedRecord:  # fmt: skip
    found = RetrievalCompleted(tenant=tenant, task_id=task, step_id="s1", call_id="c1", hits=hits)
    body = found.to_bytes()
    token = keys.signer(by).token(tenant=tenant, msg_type=found.type, body=body, msg_id="m-1", now=at)
    text = body.decode()
    if tamper:
        text = text.replace("The sky is blue.", "The sky is green.")
    return SignedRecord(body=text, token=token)


def request(*records: SignedRecord) -> CheckRequested:
    return CheckRequested(
        tenant="acme",
        task_id="t1",
        goal="g",
        answer="a [a.md#3]",
        started_at=STARTED,
        steps=(StepResult(step_id="s1", output="o", retrievals=records),),
        answer_step="s1",
    )


@pytest.fixture
def checker(keys) -> Checker:
    settings = ServiceSettings(service="checker", signing_key_file=Path("unused"), trust_bundle_file=Path("unused"))
    return Checker(Mesh(settings, signer=keys.signer("checker"), verifier=keys.verifier()))


async def test_a_record_rag_signed_for_this_task_resolves(keys, checker):
    passages = await checker.retrieved(request(record(keys)), at=STARTED + 60)
    assert passages == {("a.md", "3"): HIT}


@pytest.mark.parametrize(
    "case",
    [
        "signed by the worker",
        "body altered",
        "another task",
        "another tenant",
        "signed before the task",
        "after the check",
    ],
)
async def test_a_record_anyone_could_have_made_up_does_not_resolve(keys, checker, case):
    rec = {
        "signed by the worker": lambda: record(keys, by="worker"),
        "body altered": lambda: record(keys, tamper=True),
        "another task": lambda: record(keys, task="t2"),
        "another tenant": lambda: record(keys, tenant="globex"),
        "signed before the task": lambda: record(keys, at=STARTED - 3600),
        "after the check": lambda: record(keys, at=STARTED + 7200),
    }[case]()
    good = record(keys, hits=(HIT.model_copy(update={"chunk_id": "4"}),))
    passages = await checker.retrieved(request(rec, good), at=STARTED + 60)
    assert set(passages) == {("a.md", "4")}, f"{case}: only the genuine record resolves"


async def test_a_record_signed_with_a_key_retired_before_it_is_refused(keys, checker):
    """A stolen old key cannot mint records for a running task: rag's key retired at STARTED + 1
    verifies a record signed before that, not one signed after (within the task's lifetime)."""
    from dataclasses import replace

    from mesh_identity import Key, TrustBundle, new_signing_key

    shared = checker.mesh.verifier.bundle
    rag = shared.principals["rag"]
    new = new_signing_key()
    rotated = replace(
        rag, public_key=new.public_key(), keys=(Key(rag.public_key, retired_at=STARTED + 1), Key(new.public_key()))
    )
    checker.mesh.verifier.bundle = TrustBundle({**shared.principals, "rag": rotated}, shared.auditors, shared.revision)
    early = record(keys, at=STARTED)  # the old key, while it was current
    late = record(keys, at=STARTED + 30, hits=(HIT.model_copy(update={"chunk_id": "9"}),))  # the old key, after
    passages = await checker.retrieved(request(early, late), at=STARTED + 60)
    assert set(passages) == {("a.md", "3")}
