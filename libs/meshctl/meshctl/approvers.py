"""People with a key of their own, trusted for one tenant: approvers and workflow authors.

The same holds for both roles (``role``: ``approver``, the default, or ``author``); approvers:

    meshctl approvers add alice --tenant acme      # a key for approver.acme.alice, in the trust bundle
    meshctl approvals --as approver.acme.alice     # acme's waiting calls
    meshctl approve ID --as approver.acme.alice    # the decision is signed with alice's key
    meshctl approvers remove alice --tenant acme   # her key leaves the bundle: nothing she signs counts

Every service follows the trust bundle (KV ``trust``), so a person is trusted, and distrusted,
within a second, without a restart. What a decision proves is the signature: the tool-executor
believes ``approver.acme.alice`` only for tenant ``acme`` (the verifier refuses a principal bound
to a tenant speaking for another) and records her as the one who decided, in the approval record
and the audit chain. The connection that carries the decision is the approval console's own NATS
user (``approver``), which may read every tenant's waiting approvals: a person's view being
limited to their tenant is the console's courtesy, not a boundary; their decisions are.

A tenant that names at least one person has them alone: the console's own ``approver`` identity
may no longer decide its calls (``TrustBundle.approvers``; the tool-executor refuses it, judged
under the newest published bundle). Removing the last one gives the tenant's calls back to the
console, so no tenant is left with calls nobody may decide.

Authors (``meshctl authors add alice --tenant acme``: ``author.acme.alice``) publish, deprecate,
restore and delete the tenant's workflows (``meshctl workflow publish FILE --as author.acme.alice``).
Their changes travel over the tenant's client connection, signed with their own key; the planner
judges each under the newest bundle, so removing an author stops their next change at once.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from mesh_contracts.base import APPROVER, AUTHOR
from mesh_identity import Principal, TrustBundle, new_signing_key, private_pem
from meshctl.errors import MeshctlError

if TYPE_CHECKING:
    from meshctl.identity import Identities

PERSON = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class ApproverError(MeshctlError):
    """An approver that cannot be added or removed; one line for the operator."""


ROLES = (APPROVER, AUTHOR)


def principal_of(tenant: str, person: str, role: str = APPROVER) -> str:
    return f"{role}.{tenant}.{person}"


def people(bundle: TrustBundle, tenant: str | None = None, role: str = APPROVER) -> list[Principal]:
    """The people of ``role`` (not the console's own ``approver``), of ``tenant`` or of all."""
    return sorted(
        (p for p in bundle.principals.values() if p.role == role and p.tenant and (tenant in (None, p.tenant))),
        key=lambda p: p.name,
    )


def _check(ids: Identities, tenant: str, person: str, role: str) -> str:
    if role not in ROLES:
        raise ApproverError(f"no such role {role!r} (roles: {', '.join(ROLES)})")
    if not PERSON.fullmatch(person):
        raise ApproverError(f"{role} name {person!r}: 1-32 of a-z, 0-9, '-' and '_', starting with a letter or digit")
    if tenant not in ids.tenants():
        raise ApproverError(f"unknown tenant {tenant!r} (tenants: {', '.join(ids.tenants()) or 'none'})")
    return principal_of(tenant, person, role)


async def add(
    ids: Identities, tenant: str, person: str, nats_url: str | list[str], role: str = APPROVER
) -> tuple[str, int]:
    """Mint ``person``'s signing key, trust it for ``tenant`` in ``role`` and publish the bundle;
    returns the principal and the bundle's new revision."""
    from meshctl.identity import _write_secret
    from meshctl.rotation import publish_bundle

    name = _check(ids, tenant, person, role)
    bundle = TrustBundle.from_file(ids.trust_bundle)
    if name in bundle.principals:
        raise ApproverError(f"{name} is already an {role} (remove it first to issue a new key)")
    key = new_signing_key()
    _write_secret(ids.signing_key(name), private_pem(key))
    added = Principal(name, role, tenant, key.public_key())
    bundle = bundle.changed({**bundle.principals, name: added})
    await publish_bundle(ids, bundle, nats_url)
    return name, bundle.revision


async def remove(
    ids: Identities, tenant: str, person: str, nats_url: str | list[str], role: str = APPROVER
) -> tuple[str, int]:
    """Take ``person``'s key out of the bundle (publishing it) and retire the key file."""
    from meshctl.rotation import publish_bundle

    name = _check(ids, tenant, person, role)
    bundle = TrustBundle.from_file(ids.trust_bundle)
    if name not in bundle.principals:
        raise ApproverError(f"{name} is not an {role} (list them with: meshctl {role}s list)")
    remaining = {k: v for k, v in bundle.principals.items() if k != name}
    bundle = bundle.changed(remaining)
    await publish_bundle(ids, bundle, nats_url)
    key = ids.signing_key(name)
    if key.exists():  # never trusted again, not even by meshctl init
        os.replace(key, key.with_name(key.name + ".revoked"))
    return name, bundle.revision
