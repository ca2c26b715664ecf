"""Values services store in key-value buckets with a tenant's content in some fields: those
fields sealed at rest with the tenant's data key (``mesh_contracts.sealing``), each bound to the
key the value is stored at, so a sealed value copied to another key does not open."""

from __future__ import annotations

from typing import Any, ClassVar, Self

from pydantic import BaseModel

from mesh_contracts import sealing
from mesh_contracts.base import field_decoder
from mesh_contracts.decode import decode


class Sealable(BaseModel):
    """A stored value with fields of a tenant's content, sealed at rest with its data key
    (``mesh_contracts.sealing``): the tenant is the value's ``tenant`` field, else the first token
    of the key it is stored at, and each sealed field is bound to that key."""

    sealed: ClassVar[tuple[str, ...]] = ()
    """Fields that carry the tenant's own content."""
    seal_name: ClassVar[str] = ""
    """What a sealed field is bound to besides its key (the schema's name)."""

    @classmethod
    def seal_id(cls) -> str:
        return cls.seal_name

    def to_bytes(self, key: str = "") -> bytes:
        """The stored form; with a keyring installed, the ``sealed`` fields sealed (``key``: where
        the value is stored)."""
        if not self.sealed or sealing.installed() is None:
            return self.model_dump_json().encode()
        if not key:
            raise ValueError(f"{self.seal_id()} seals tenant content: to_bytes needs the key it is stored at")
        value = self.model_dump(mode="json")
        tenant = str(value.get("tenant") or key.split(".")[0])
        return sealing.dumps(sealing.seal_fields(value, self.sealed, tenant, f"{self.seal_id()}|{key}"))

    @classmethod
    def from_bytes(cls, data: bytes, key: str = "") -> Self:
        """The value stored at ``key``, its sealed fields opened (``SealError`` if they do not)."""
        if b'"$sealed"' not in data:
            return cls.model_validate_json(data)
        return cls.model_validate(open_stored(data, key, cls.seal_id()))


APPROVAL_RECORD = "record.approval/v1"
"""An ``approvals`` record (the tool-executor writes it; the approvers' console reads it)."""
STEP_RUN = "record.step-run/v1"
"""A worker's checkpoint of a step (``steps``)."""
LEDGER = "ledger"
"""A recorded result (``ledger``, ``calls``; its key ``<service>.<tenant>.…``)."""
RAG_MANIFEST = "rag.manifest"
"""A tenant's index manifest (``rag``)."""
SEALED_IN: dict[str, str] = {
    "tasks": "record.task/v1", "evidence": "record.evidence/v1", "steps": STEP_RUN, "approvals": APPROVAL_RECORD,
    "ledger": LEDGER, "calls": LEDGER, "rag": RAG_MANIFEST,
}  # fmt: skip
"""Per bucket, what its values' sealed fields are bound to besides their key (its ``seal_id()``):
for a reader of the bucket that is not the value's writer (``meshctl tenant export``)."""


def open_stored(data: bytes, key: str, name: str, tenant: str | None = None) -> Any:
    """A stored value as JSON with its sealed fields opened (``name``: its ``seal_id()``; the
    tenant: ``tenant``, else the value's ``tenant`` field, else the key's first token)."""
    value = decode(data, max_bytes=len(data), unique_keys=False)
    tenant = tenant or str(value.get("tenant") or key.split(".")[0])
    return sealing.open_fields(value, tenant, f"{name}|{key}", field_decoder())
