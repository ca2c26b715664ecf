"""Base class and metadata shared by every message contract.

A contract is a pydantic model with a literal ``type`` discriminator, plus class-level
metadata (``ContractSpec``) saying where it travels (domain and subject event token),
which principals may produce it and which services consume it. That metadata is the
single source for subjects, NATS permissions, consumer provisioning and the identity
check a consumer runs on every message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh_contracts import sealing
from mesh_contracts.decode import DEFAULT_LIMITS, DEFAULT_MAX_BYTES, DecodeError, DecodeLimits, decode
from mesh_contracts.errors import ContractsError

# Ids become subject tokens: no dots, spaces or wildcards, or a tenant could address
# another tenant's subjects.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
POOL_PATTERN = r"^([a-z0-9][a-z0-9-]{0,30})?$"
"""A worker pool's name ('' : the shared workers): a worker deployment of its own (issue 48)."""

# Principals that are not services. ``client`` is a tenant's own application (one
# identity per tenant); ``approver`` is a human operator answering approval requests.
CLIENT = "client"
APPROVER = "approver"
AUTHOR = "author"
"""A person who publishes, deprecates and deletes a tenant's workflows (``author.<tenant>.<person>``,
one key each in the trust bundle); their changes reach the planner through the tenant's door."""
ADMIN = "admin"
"""The operators' identity (provisioning, ``meshctl``): it asks services what they see."""
SERVICES: tuple[str, ...] = ("planner", "worker", "checker", "rag", "tool-executor", "budget")

Transport = Literal["stream", "request", "reply", "core"]


@dataclass(frozen=True)
class ContractSpec:
    """Where a message travels and who may send and receive it.

    ``transport="stream"`` messages are published to JetStream on
    ``<domain>.v<major>.<tenant>.<task>.<event>``; ``request`` messages use core NATS
    request/reply on the same subject shape and are answered by ``reply`` contracts,
    which travel on the requester's inbox and have no subject of their own. ``core`` messages
    are fire-and-forget core-NATS publishes on the same subject shape: live, never stored
    (streamed tokens), so a subscriber that is not listening misses them by design.
    """

    domain: str
    event: str
    producers: tuple[str, ...]
    consumers: tuple[str, ...] = ()
    transport: Transport = "stream"
    major: int = 1
    summary: str = ""
    max_bytes: int = DEFAULT_MAX_BYTES
    """Largest body the bounded decoder accepts for this message (``decode.py``)."""
    sealed: tuple[str, ...] = ()
    """Fields that carry the tenant's own content, sealed at rest with its data key
    (``sealing.py``; the README's data section lists them per message)."""
    routed: bool = False
    """A message may go to one worker pool's consumer only (``Contract.routed_to``: a sixth subject
    token); the producers may publish ``<domain>.v<major>.*.*.<event>.*``."""
    acked: bool = True
    """``stream`` messages only. False: the publisher does not wait for the stream's
    acknowledgement (a core publish onto the stream's subject: stored, deduplicated by its id,
    but one published while the broker is unreachable or the stream is full is lost, unseen).
    For what nothing depends on: progress events, which a client also sees live."""

    @property
    def unique_keys(self) -> bool:
        """Whether a key twice in one object is refused: for what tenants and people write,
        where two parsers picking different duplicates would be an attack on the reader."""
        return bool({CLIENT, APPROVER, AUTHOR} & set(self.producers))

    def subject(self, tenant: str, task: str) -> str:
        """The concrete subject for one tenant and task."""
        return f"{self.domain}.v{self.major}.{tenant}.{task}.{self.event}"


class ContractError(ValueError, ContractsError):
    """A payload that is not a valid message of the expected contract."""


class BodyError(ContractError):
    """A body the bounded decoder refused before any validation (too big, not UTF-8, not JSON,
    too deep...); its message is the reason, ``decode: ...``."""


class Contract(BaseModel):
    """Base of every message body.

    Unknown fields are accepted (tolerant reader: a newer producer may add optional
    fields) and kept in ``model_extra``; ``parse(..., strict=True)`` rejects them, which
    is how the tests run.
    """

    model_config = ConfigDict(extra="allow", frozen=True, use_attribute_docstrings=True)

    spec: ClassVar[ContractSpec]
    type: str

    tenant: str = Field(pattern=ID_PATTERN)
    """Tenant that owns the task; also the third token of the subject."""

    task_id: str = Field(pattern=ID_PATTERN)
    """Task this message belongs to; also the fourth token of the subject."""

    release: str = Field("", pattern=r"^([0-9a-f]{16})?$")
    """The release of the tenant's behaviour (``v1.release``) the task runs: the version of the
    prompts, model routes and tool rules its messages were made with ('' : the packaged ones).
    Set by the planner when it admits a task and carried on every message of it; on a
    ``task.submitted``, a request to run that version of the tenant's (``meshctl release eval``)."""

    @classmethod
    def schema_id(cls) -> str:
        """Stable schema identifier, e.g. ``task.submitted/v1``."""
        return f"{cls.model_fields['type'].default}/v{cls.spec.major}"

    @classmethod
    def type_name(cls) -> str:
        return str(cls.model_fields["type"].default)

    def routed_to(self) -> str:
        """The worker pool this message goes to ('' : the service's shared durable). Only a
        contract whose spec is ``routed`` names one (``step.requested``)."""
        return ""

    def subject(self) -> str:
        """Where it is published: ``spec.subject``, with a sixth token naming the pool when it is
        routed to one (``step.v1.acme.t-1.requested.heavy``): the shared durable filters on five
        tokens, so it never sees it, and the pool's durable on that sixth token."""
        pool = self.routed_to()
        base = self.spec.subject(self.tenant, self.task_id)
        return f"{base}.{pool}" if pool else base

    def to_bytes(self) -> bytes:
        """Canonical JSON encoding of the body (what the identity token digests), with the fields
        of ``spec.sealed`` sealed to the tenant's data key when this process holds a keyring."""
        if not self.spec.sealed or sealing.installed() is None:
            return self.model_dump_json(exclude_none=False).encode()
        value = self.model_dump(mode="json", exclude_none=False)
        return sealing.dumps(sealing.seal_fields(value, self.spec.sealed, self.tenant, self.seal_context(value)))

    @classmethod
    def seal_context(cls, value: dict[str, Any]) -> str:
        """What a sealed field of this body is bound to: its type, tenant and task."""
        return f"{cls.schema_id()}|{value.get('tenant')}|{value.get('task_id')}"

    @classmethod
    def parse(cls, data: bytes | str, *, strict: bool = False, limits: DecodeLimits = DEFAULT_LIMITS) -> Contract:
        """Decode (bounded: ``decode.py``) and validate ``data`` as this contract.

        Raises ``ContractError`` with a readable, one-paragraph reason (``BodyError`` when the
        body could not even be decoded within the limits).
        """
        try:
            value = decode(data, max_bytes=cls.spec.max_bytes, unique_keys=cls.spec.unique_keys, limits=limits)
        except DecodeError as exc:
            raise BodyError(str(exc)) from None
        try:
            value = sealing.open_fields(value, str(value.get("tenant")), cls.seal_context(value), field_decoder(limits))
        except (sealing.SealError, DecodeError) as exc:
            raise ContractError(f"{cls.type_name()}: {exc}") from None
        try:
            model = cls.model_validate(value)
        except ValidationError as exc:
            raise ContractError(_explain(cls.type_name(), exc)) from None
        if strict and model.model_extra:
            raise ContractError(f"{cls.type_name()}: unknown field(s) {sorted(model.model_extra)} (strict mode)")
        return model


def field_decoder(limits: DecodeLimits = DEFAULT_LIMITS) -> Any:
    """The bounded decoder for what one sealed field held (any JSON value): nesting and integers
    within ``limits``; its size is the sealed body's, which was bounded when that was decoded."""

    def one(plain: bytes) -> Any:
        return decode(b'{"v":' + plain + b"}", max_bytes=len(plain) + 6, unique_keys=False, limits=limits)["v"]

    return one


def _explain(type_name: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "<body>"
        parts.append(f"{loc}: {err['msg']}")
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return f"invalid {type_name}: " + "; ".join(parts) + more
