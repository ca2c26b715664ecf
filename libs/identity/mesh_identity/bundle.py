"""The trust bundle: every principal's public keys (with their history), signed by the operator;
a newer bundle is accepted only if the current one's operator signed it."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from mesh_contracts.base import APPROVER
from mesh_identity.errors import IdentityError
from mesh_identity.keys import (
    Key,
    Principal,
    _load_public,
    public_pem,
)  # fmt: skip
from mesh_identity.registry import Directory, Layered


class TrustBundle:
    """Public keys of every principal, with their role and tenant, and each tenant's auditor
    sealing key (X25519: what is sealed to it only the tenant's auditor can open). ``revision``
    grows with every change an operator publishes (rotation, revocation)."""

    def __init__(
        self,
        principals: dict[str, Principal],
        auditors: dict[str, bytes] | None = None,
        revision: int = 0,
        data_keys: dict[str, str] | None = None,
    ) -> None:
        self.principals = principals
        self.auditors = auditors or {}
        self.revision = revision
        self.data_keys = data_keys or {}
        """Each tenant's data key, wrapped by the deployment's data key (``datakeys.wrap``): only a
        holder of that key (the services, the operators) can unwrap one; an erased tenant has none."""
        self.directory: Directory | None = None
        """The registered tenants its lookups fall back to (``attach``), if any."""

    def attach(self, directory: Directory) -> TrustBundle:
        """Make this bundle's lookups of a principal, an auditor's key and a data key fall back to
        the tenants registered at runtime that ``directory`` holds (``mesh_identity.registry``)."""
        self.principals = Layered(self.principals, directory.principal)
        self.auditors = Layered(self.auditors, directory.auditor)
        self.data_keys = Layered(self.data_keys, directory.data_key)
        self.directory = directory
        return self

    def changed(
        self,
        principals: dict[str, Principal] | None = None,
        *,
        auditors: dict[str, bytes] | None = None,
        data_keys: dict[str, str] | None = None,
    ) -> TrustBundle:
        """This bundle with what is given replaced and its revision one higher: what rotation,
        revocation and erasure publish."""
        return TrustBundle(
            self.principals if principals is None else principals,
            self.auditors if auditors is None else auditors,
            self.revision + 1,
            self.data_keys if data_keys is None else data_keys,
        )

    def approvers(self, tenant: str) -> list[Principal]:
        """The people named to decide ``tenant``'s held tool calls (``approver.<tenant>.<person>``),
        by name. While there is one, they alone decide the tenant's calls: the console's own
        ``approver``, bound to no tenant, may not."""
        return sorted(
            (p for p in self.principals.values() if p.role == APPROVER and p.tenant == tenant), key=lambda p: p.name
        )

    def may_decide(self, name: str, tenant: str) -> str | None:
        """Why ``name`` may not decide for ``tenant`` (a held call, a draft plan) under this bundle,
        or None. A tenant that names approvers has them alone: the console's own ``approver``
        (bound to no tenant) may not decide for it; with none named, the console decides."""
        now = self.principals.get(name)
        if now is None or now.role != APPROVER:
            return f"{name} is no longer an approver (trust bundle revision {self.revision})"
        if now.tenant is None:
            named = [p.name for p in self.approvers(tenant)]
            if named:
                who = ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
                return f"tenant {tenant!r} names its own approvers ({who}): {name} may not decide its calls"
        elif now.tenant != tenant:
            return f"{name} may speak only for tenant {now.tenant!r}, not {tenant!r}"
        return None

    @classmethod
    def from_json(cls, data: str | bytes) -> TrustBundle:
        raw = json.loads(data)
        out = {}
        for name, entry in raw["principals"].items():
            key = _load_public(name, entry["public_key"])
            keys = tuple(Key(_load_public(name, k["public_key"]), k.get("retired_at")) for k in entry.get("keys") or ())
            out[name] = Principal(name, entry["role"], entry.get("tenant"), key, keys)
        auditors = {}
        for tenant, b64 in (raw.get("auditors") or {}).items():
            key_bytes = base64.b64decode(b64)
            if len(key_bytes) != 32:
                raise IdentityError(f"trust bundle: auditor key of {tenant} is not a 32-byte X25519 key")
            auditors[tenant] = key_bytes
        data_keys = {str(t): str(w) for t, w in (raw.get("data_keys") or {}).items()}
        return cls(out, auditors, int(raw.get("revision", 0)), data_keys)

    @classmethod
    def from_file(cls, path: str | Path) -> TrustBundle:
        return cls.from_json(Path(path).read_bytes())

    @staticmethod
    def to_json(
        entries: dict[str, tuple[str, str | None, Ed25519PublicKey]], auditors: dict[str, bytes] | None = None
    ) -> str:
        """Serialise ``name -> (role, tenant, public key)`` and ``tenant -> auditor X25519 public key``."""
        principals = {name: Principal(name, role, tenant, pub) for name, (role, tenant, pub) in entries.items()}
        return TrustBundle(principals, auditors).dump()

    def dump(self) -> str:
        def entry(p: Principal) -> dict[str, Any]:
            out: dict[str, Any] = {"role": p.role, "tenant": p.tenant, "public_key": public_pem(p.public_key)}
            if p.keys:
                out["keys"] = [{"public_key": public_pem(k.public_key), "retired_at": k.retired_at} for k in p.keys]
            return out

        return json.dumps(
            {
                "version": 1,
                "revision": self.revision,
                "principals": {name: entry(p) for name, p in sorted(self.principals.items())},
                "auditors": {t: base64.b64encode(k).decode() for t, k in sorted(self.auditors.items())},
                "data_keys": dict(sorted(self.data_keys.items())),
            },
            indent=2,
        )
