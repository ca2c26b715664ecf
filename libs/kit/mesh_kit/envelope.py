"""Envelope headers: metadata that travels beside the body, never inside it."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

from mesh_contracts import facts
from mesh_contracts.topology import ENVELOPED

if TYPE_CHECKING:
    from mesh_contracts import Contract
    from mesh_identity import Signer

SCHEMA = "Mesh-Schema"
TENANT = "Mesh-Tenant"
TASK = "Mesh-Task"
CAUSATION = "Mesh-Causation"
IDENTITY = "Mesh-Identity"
FACTS = facts.HEADER  # what the budget may know of the message (covered by the token)
MSG_ID = "Nats-Msg-Id"
CAUSE: ContextVar[str] = ContextVar("mesh_cause", default="")
"""The id of the message being handled (set around each handler): the causation of what the
handler publishes unless it names another (``meshctl history`` orders a task's story by it)."""

RELEASE: ContextVar[tuple[str, str, str] | None] = ContextVar("mesh_release", default=None)
"""(tenant, task, release) of the message being handled, or as a handler that acts for a task
sets it (``releasing``): what the handler publishes for that task carries the same release
(``Contract.release``) unless it names one."""

DLQ_REASON = "Mesh-Dlq-Reason"
DLQ_KIND = "Mesh-Dlq-Kind"  # "rejected" (never valid) or "failed" (valid, handler gave up)
DLQ_SERVICE = "Mesh-Dlq-Service"
DLQ_SUBJECT = "Mesh-Dlq-Subject"
DLQ_STREAM = "Mesh-Dlq-Stream"
DLQ_SEQ = "Mesh-Dlq-Seq"
DLQ_DELIVERIES = "Mesh-Dlq-Deliveries"
DLQ_STORED_AT = "Mesh-Dlq-Stored-At"  # when the broker first stored the original (unix seconds)
REDRIVE = "Mesh-Redrive"  # `meshctl dlq retry`: the operator's signed re-drive statement (identity.Redrive)
REDRIVE_OF = "Mesh-Redrive-Of"  # the dead letter's DLQ sequence (informational; the statement decides)
ORIGINAL_STORED_AT = "Mesh-Original-Stored-At"  # informational; the statement's time is the one used
ORIG_PREFIX = "Mesh-Orig-"


def stamped(model: Contract) -> Contract:
    """``model`` with the release of the task being handled (``RELEASE``), if it names none."""
    current = RELEASE.get()
    if current is None or model.release or (model.tenant, model.task_id) != current[:2]:
        return model
    return model.model_copy(update={"release": current[2]})


class releasing:
    """Publish what follows for ``task`` with ``release`` (a handler that acts for a task it did
    not receive a message of: the planner flushing a record's outbox, a timer firing)."""

    def __init__(self, tenant: str, task_id: str, release: str) -> None:
        self.value = (tenant, task_id, release) if release else None

    def __enter__(self) -> None:
        self._token = RELEASE.set(self.value)

    def __exit__(self, *exc: object) -> None:
        RELEASE.reset(self._token)


def message_id(msg_type: str, tenant: str, task_id: str, key: str) -> str:
    """Deterministic ``Nats-Msg-Id``: the same logical message always gets the same id,
    so a re-dispatch after a crash is dropped by the server's dedup window."""
    return f"{msg_type}:{tenant}:{task_id}:{key}"


def stored_size(subject: str, body: bytes, headers: dict[str, str]) -> int:
    """The bytes a stream stores for one message, as the tenants' quotas count them: subject,
    body and each header (name, value and its separators)."""
    return len(subject) + len(body) + sum(len(k) + len(v) + 4 for k, v in headers.items())


def one_line(text: str, limit: int = 1000) -> str:
    """Header-safe single line (NATS headers cannot carry newlines)."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def headers_for(
    signer: Signer, model: Contract, body: bytes, msg_id: str, causation: str | None = None
) -> dict[str, str]:
    """Every envelope header of one message, including its signed identity token over ``body``
    and, for a message the budget follows without its body (``topology.ENVELOPED``), its facts
    (``mesh_contracts.facts``), which the token covers too."""
    told = None
    if model.spec.transport == "stream" and model.spec.domain in ENVELOPED:
        told = facts.encode(facts.facts(model, signer.fingerprint))
    headers = {
        SCHEMA: model.schema_id(),
        TENANT: model.tenant,
        TASK: model.task_id,
        MSG_ID: msg_id,
        IDENTITY: signer.token(tenant=model.tenant, msg_type=model.type, body=body, msg_id=msg_id, facts=told),
    }
    if told is not None:
        headers[FACTS] = told
    if causation:
        headers[CAUSATION] = causation
    return headers
