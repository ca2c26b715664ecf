"""Mint every identity of a mesh: NATS operator/account/user JWTs (with ``nkeys``, no ``nsc``)
and the Ed25519 keys services sign messages with, plus the trust bundle.

Layout under the mesh home (``.mesh/`` by default)::

    secrets/operator.jwt, secrets/*.nk           operator and account keys (0600)
    secrets/creds/<principal>.creds              NATS user JWT + seed, one per principal (0600)
    secrets/keys/<principal>.pem                 message-signing key, one per principal (0600)
    secrets/keys/auditor.<tenant>.key            the tenant auditor's X25519 key: opens the destinations
                                                 the audit seals for the tenant (0600)
    secrets/audit.key                            the deployment's audit key: keyed hashes of destinations (0600)
    secrets/data.key                             the deployment's data key: wraps each tenant's data key (0600)
    secrets/keys/data.<tenant>.key               the tenant's data key, for its clients: seals its content (0600)
    trust-bundle.json                            public keys of every principal and each tenant's wrapped
                                                 data key (not secret without data.key)
    nats/server.conf                             operator-mode config, memory resolver

Account users are signed by an account *signing key*, so the account's identity key is
needed only to re-issue the account JWT. Nothing here is ever logged.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import time
from pathlib import Path
from typing import Any, cast

import nkeys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.public import PrivateKey

from mesh_contracts import sealing
from mesh_identity import Principal, TrustBundle, load_private_key, new_signing_key, private_pem
from mesh_identity.datakeys import Keyring, new_data_key, read_key_file, unwrap, wrap
from mesh_identity.registry import Layered
from mesh_kit import ServiceSettings
from mesh_kit.settings import inbox_prefix, tls_context
from meshctl import tls
from meshctl.policy import Permissions, policy

ACCOUNT = "MESH"
ACCOUNT_LIMITS: dict[str, object] = {
    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1, "leaf": -1,
}  # fmt: skip
"""An account JWT's limits: none (what a tenant may do is bounded by its user's permissions and the doors)."""


def _b64(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def new_keypair(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(bytearray(nkeys.encode_seed(os.urandom(32), prefix)))


def encode_jwt(claims: dict[str, object], issuer: nkeys.KeyPair) -> str:
    """A NATS JWT (``ed25519-nkey``): jti is base32(sha512/256(claims)), per nats-io/jwt v2."""
    claims = {"iat": int(time.time()), "iss": issuer.public_key.decode(), **claims}
    body = json.dumps(claims, separators=(",", ":"), sort_keys=True).encode()
    claims["jti"] = base64.b32encode(hashlib.new("sha512_256", body).digest()).rstrip(b"=").decode()
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode())
    return f"{header}.{payload}.{_b64(issuer.sign(f'{header}.{payload}'.encode()))}"


def _write_secret(path: Path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, 0o600)


write_secret = _write_secret
"""Write a file only its owner may read (mode 0600), its folder 0700."""


def _load_or_new(path: Path, prefix: int) -> nkeys.KeyPair:
    if path.exists():
        return nkeys.from_seed(bytearray(path.read_bytes().strip()))
    kp = new_keypair(prefix)
    _write_secret(path, kp.seed)
    return kp


def _load_or_new_auditor(path: Path) -> PrivateKey:
    """A tenant auditor's X25519 key (base64 in the file); made once, then reused."""
    if path.exists():
        return PrivateKey(base64.b64decode(path.read_text().strip()))
    key = PrivateKey.generate()
    _write_secret(path, base64.b64encode(bytes(key)).decode())
    return key


def user_of(creds: Path) -> nkeys.KeyPair:
    """The NATS user key pair in a ``.creds`` file."""
    text = creds.read_text()
    seed = text.split("-----BEGIN USER NKEY SEED-----", 1)[1].split("------END USER NKEY SEED------", 1)[0]
    return nkeys.from_seed(bytearray(seed.strip().encode()))


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    # json.loads is untyped: a JWT's payload is a JSON object
    return cast(dict[str, Any], json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def _nats_claims(creds: Path) -> tuple[Any, ...]:
    """What a creds file's user JWT allows (publish, subscribe, responses)."""
    token = creds.read_text().split("-----BEGIN NATS USER JWT-----\n", 1)[1].split("\n", 1)[0]
    nats = _claims(token)["nats"]
    return (nats["pub"].get("allow"), nats["sub"].get("allow"), nats.get("resp"), _claims(token).get("exp"))


def _wanted(perms: Permissions) -> tuple[Any, ...]:
    return (perms.pub, perms.sub, {"max": 1, "ttl": 0} if perms.allow_responses else None, None)


def _raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def user_jwt(
    account: nkeys.KeyPair,
    signing: nkeys.KeyPair,
    user: nkeys.KeyPair,
    perms: Permissions,
    expires_in_s: int | None = None,
) -> str:
    nats: dict[str, object] = {
        "type": "user",
        "version": 2,
        "subs": -1,
        "data": -1,
        "payload": -1,
        "issuer_account": account.public_key.decode(),
        "pub": {"allow": perms.pub},
        "sub": {"allow": perms.sub},
    }
    if perms.allow_responses:
        nats["resp"] = {"max": 1, "ttl": 0}
    claims: dict[str, object] = {"sub": user.public_key.decode(), "name": perms.principal, "nats": nats}
    if expires_in_s:
        claims["exp"] = int(time.time()) + expires_in_s
    return encode_jwt(claims, signing)


def creds_text(jwt: str, user: nkeys.KeyPair) -> str:
    return (
        "-----BEGIN NATS USER JWT-----\n"
        f"{jwt}\n"
        "------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n"
        "NKEYs are sensitive and should be treated as secrets.\n\n"
        "-----BEGIN USER NKEY SEED-----\n"
        f"{user.seed.decode()}\n"
        "------END USER NKEY SEED------\n\n"
        "*************************************************************\n"
    )


def _account_jwts(
    op: nkeys.KeyPair, sys_pub: str, acc_pub: str, signing: nkeys.KeyPair, revoked: dict[str, int]
) -> dict[str, str]:
    """The resolver preload: the SYS account's JWT and the mesh account's (its users signed by
    ``signing``, its revocations kept), both signed by the operator."""
    base_limits = ACCOUNT_LIMITS
    return {
        sys_pub: encode_jwt(
            {"sub": sys_pub, "name": "SYS", "nats": {"type": "account", "version": 2, "limits": base_limits}}, op
        ),
        acc_pub: encode_jwt(
            {
                "sub": acc_pub,
                "name": ACCOUNT,
                "nats": {
                    "type": "account",
                    "version": 2,
                    "signing_keys": [signing.public_key.decode()],
                    "limits": {**base_limits, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1},
                    "default_permissions": {"pub": {}, "sub": {}},
                    **({"revocations": revoked} if revoked else {}),
                },
            },
            op,
        ),
    }


class Identities:
    """Paths of one mesh home's identity material."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.secrets = home / "secrets"

    def creds(self, principal: str) -> Path:
        return self.secrets / "creds" / f"{principal}.creds"

    def signing_key(self, principal: str) -> Path:
        return self.secrets / "keys" / f"{principal}.pem"

    def auditor_key(self, tenant: str) -> Path:
        return self.secrets / "keys" / f"auditor.{tenant}.key"

    @property
    def tls_ca(self) -> Path:
        """The CA certificate of the NATS servers: what every client of this mesh trusts
        (``MESH_TLS_CA_FILE`` when set, as in Kubernetes; else the one ``init`` minted)."""
        return Path(os.environ.get("MESH_TLS_CA_FILE") or self.home / "tls" / "ca.pem")

    @property
    def tls_server(self) -> tuple[Path, Path]:
        """The servers' certificate and key, beside the server configs (a container mounting the
        config directory finds them at the same path)."""
        return self.home / "nats" / "tls" / "server.pem", self.home / "nats" / "tls" / "server.key"

    def tls_context(self) -> ssl.SSLContext | None:
        return tls_context(self.tls_ca if self.tls_ca.exists() else None)

    def connect_options(self, principal: str) -> dict[str, Any]:
        """nats-py ``connect`` options to speak as ``principal``: its credentials, the only inbox it
        may read, and TLS verified against this mesh's CA."""
        return {
            "user_credentials": str(self.creds(principal)),
            "inbox_prefix": inbox_prefix(principal),
            "tls": self.tls_context(),
        }

    @property
    def audit_key(self) -> Path:
        return self.secrets / "audit.key"

    @property
    def data_key(self) -> Path:
        """The deployment's data key: wraps each tenant's data key (``mesh_identity.datakeys``)."""
        return self.secrets / "data.key"

    def tenant_data_key(self, tenant: str) -> Path:
        """The tenant's own data key, unwrapped: what its clients seal and open its content with."""
        return self.secrets / "keys" / f"data.{tenant}.key"

    def keyring(self) -> Keyring | None:
        """Seals and opens every tenant's content as the services do (None: no data key here)."""
        if not self.data_key.exists():
            return None
        kek = read_key_file(self.data_key)
        state: dict[str, Any] = {"at": None, "keys": {}}
        local: dict[str, str] = {}

        def own_copy(tenant: str) -> str | None:
            """A tenant added at runtime: its data key is not in the bundle but its copy is here."""
            if tenant not in local:
                path = self.tenant_data_key(tenant)
                if not path.exists():
                    return None
                local[tenant] = wrap(kek, tenant, bytes.fromhex(path.read_text().strip()))
            return local[tenant]

        def wrapped() -> dict[str, str]:  # the bundle as the home holds it now (erasure rewrites it)
            try:
                st = self.trust_bundle.stat()
            except FileNotFoundError:
                return {}
            if state["at"] != (st.st_mtime_ns, st.st_size):
                state["at"], state["keys"] = (
                    (st.st_mtime_ns, st.st_size),
                    TrustBundle.from_file(self.trust_bundle).data_keys,
                )
            return state["keys"]  # type: ignore[no-any-return]

        return Keyring(kek, lambda: Layered(wrapped(), own_copy))

    def install_keyring(self) -> None:
        """Read and write tenants' content sealed, in this process (``mesh_contracts.sealing``)."""
        sealing.install(self.keyring())

    @property
    def trust_bundle(self) -> Path:
        return self.home / "trust-bundle.json"

    @property
    def tenants_file(self) -> Path:
        return self.home / "tenants.json"

    def tenants(self) -> list[str]:
        return json.loads(self.tenants_file.read_text()) if self.tenants_file.exists() else []

    @property
    def pools_file(self) -> Path:
        return self.home / "pools.json"

    def pools(self) -> list[str]:
        """The worker pools of this mesh (issue 48): each has its identity ``worker-<pool>``."""
        return json.loads(self.pools_file.read_text()) if self.pools_file.exists() else []

    def exists(self) -> bool:
        return self.trust_bundle.exists() and (self.secrets / "operator.jwt").exists()

    def settings(self, service: str, nats_url: str, **overrides: Any) -> ServiceSettings:
        """Settings for a process that speaks as ``service`` with this home's identity (tests and
        benchmarks that play a service's part against a running mesh)."""
        redis_file = self.secrets / "redis" / f"{service}.url"
        return ServiceSettings(
            service=service,
            nats_url=nats_url,
            creds_file=self.creds(service),
            signing_key_file=self.signing_key(service),
            trust_bundle_file=self.trust_bundle,
            redis_url=redis_file.read_text() if redis_file.exists() else "",
            tls_ca_file=self.tls_ca if self.tls_ca.exists() else None,
            data_key_file=self.data_key if self.data_key.exists() else None,
            **overrides,
        )

    def user_of(self, principal: str) -> nkeys.KeyPair:
        """The NATS user key pair in a principal's ``.creds`` file."""
        return user_of(self.creds(principal))

    def revocations(self) -> dict[str, int]:
        """The account JWT's revocations (user public key -> revoked-before time)."""
        path = self.secrets / "preload.json"
        if not path.exists():
            return {}
        account = json.loads((self.secrets / "account.json").read_text())["id"]
        return dict(_claims(json.loads(path.read_text())[account])["nats"].get("revocations") or {})

    def revoke_users(self, users: dict[str, int]) -> None:
        """Add ``user public key -> time`` to the account JWT's revocations (every JWT of that user
        issued at or before the time stops working) and rewrite the resolver preload."""
        op = nkeys.from_seed(bytearray((self.secrets / "operator.nk").read_bytes().strip()))
        preload = json.loads((self.secrets / "preload.json").read_text())
        account = json.loads((self.secrets / "account.json").read_text())["id"]
        claims = _claims(preload[account])
        for k in ("jti", "iat", "iss"):
            claims.pop(k, None)
        claims["nats"].setdefault("revocations", {}).update(users)
        preload[account] = encode_jwt(claims, op)
        _write_secret(self.secrets / "preload.json", json.dumps(preload))

    def mint(
        self, tenants: list[str], *, user_ttl_s: int | None = None, pools: list[str] | None = None
    ) -> dict[str, str]:
        """Create (or extend) every identity; returns the resolver preload (account pub -> JWT).

        Existing operator/account keys are reused, and so are existing users and signing keys:
        re-running adds tenants (and worker ``pools``) without issuing a second valid credential for anyone. A user
        whose permissions changed gets a fresh JWT for the same key, and its older JWTs are
        revoked; the account's revocations and the bundle's key history (rotations) are kept.
        """
        revoked = self.revocations()
        self.secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
        preload, acc, signing = self._mint_accounts(revoked)
        tenants = sorted(set(self.tenants()) | set(tenants))
        self.tenants_file.write_text(json.dumps(tenants))
        if pools is not None:
            self.pools_file.write_text(json.dumps(sorted(set(self.pools()) | set(pools))))
        existing = TrustBundle.from_file(self.trust_bundle) if self.trust_bundle.exists() else None
        principals, reissued = self._mint_principals(tenants, acc, signing, user_ttl_s, existing)
        if reissued:
            time.sleep(1.0)  # the revocation must not reach the fresh JWTs issued in the same second
            self.revoke_users(reissued)
        if not self.audit_key.exists():
            _write_secret(self.audit_key, os.urandom(32).hex())
        if not self.data_key.exists():
            _write_secret(self.data_key, new_data_key().hex())
        tls.mint(self.secrets / "tls" / "ca.key", self.tls_ca, *self.tls_server, _write_secret)
        self._write_trust_bundle(principals, tenants, existing)
        return preload

    def _mint_accounts(self, revoked: dict[str, int]) -> tuple[dict[str, str], nkeys.KeyPair, nkeys.KeyPair]:
        """The operator and its two accounts (SYS and the mesh's): keys made once, JWTs signed
        afresh into operator.jwt, the resolver preload and account.json. Returns the preload and
        the mesh account's identity and signing keys, which users are issued with."""
        op = _load_or_new(self.secrets / "operator.nk", nkeys.PREFIX_BYTE_OPERATOR)
        sys_acc = _load_or_new(self.secrets / "account-SYS.nk", nkeys.PREFIX_BYTE_ACCOUNT)
        acc = _load_or_new(self.secrets / f"account-{ACCOUNT}.nk", nkeys.PREFIX_BYTE_ACCOUNT)
        signing = _load_or_new(self.secrets / f"account-{ACCOUNT}-signing.nk", nkeys.PREFIX_BYTE_ACCOUNT)
        sys_pub, acc_pub = sys_acc.public_key.decode(), acc.public_key.decode()
        _write_secret(
            self.secrets / "operator.jwt",
            encode_jwt(
                {
                    "sub": op.public_key.decode(),
                    "name": "agentmesh",
                    "nats": {"type": "operator", "version": 2, "system_account": sys_pub},
                },
                op,
            ),
        )
        preload = _account_jwts(op, sys_pub, acc_pub, signing, revoked)
        # Signed JWTs are not secret, but everything under secrets/ is 0600 so nobody has to ask.
        _write_secret(self.secrets / "preload.json", json.dumps(preload))
        _write_secret(self.secrets / "account.json", json.dumps({"name": ACCOUNT, "id": acc_pub, "system": sys_pub}))
        return preload, acc, signing

    def _mint_principals(
        self,
        tenants: list[str],
        acc: nkeys.KeyPair,
        signing: nkeys.KeyPair,
        user_ttl_s: int | None,
        existing: TrustBundle | None,
    ) -> tuple[dict[str, Principal], dict[str, int]]:
        """Credentials and a signing key for every principal of the policy, and the trust bundle's
        entries for them. Returns those entries and the users whose older JWTs are to be revoked
        (user public key -> revoked-before time)."""
        principals: dict[str, Principal] = {}
        reissued: dict[str, int] = {}
        for name, perms in policy(tenants, self.pools()).items():
            revoke = self._issue_creds(name, perms, acc, signing, user_ttl_s)
            if revoke is not None:
                reissued[revoke[0]] = revoke[1]
            # admin provisions and signs operator statements (re-drives), never mesh messages: its
            # role is a producer of no contract
            key = self._signing_key_of(name)
            prev = existing.principals.get(name) if existing else None
            same = prev is not None and _raw(prev.public_key) == _raw(key.public_key())
            principals[name] = prev if same and prev is not None else Principal(name, perms.role, perms.tenant,
                                                                                key.public_key())  # fmt: skip
        # People who approve or author for one tenant (meshctl approvers | authors add) are not in
        # the policy: keep them while their key is here (``remove`` retires the key).
        for name, prev in existing.principals.items() if existing else ():
            people = ("approver", "author")
            if name not in principals and prev.role in people and prev.tenant and self.signing_key(name).exists():
                principals[name] = prev
        return principals, reissued

    def _issue_creds(
        self, name: str, perms: Permissions, acc: nkeys.KeyPair, signing: nkeys.KeyPair, user_ttl_s: int | None
    ) -> tuple[str, int] | None:
        """A principal's ``.creds``: left alone when its permissions are unchanged (and no expiry is
        asked), re-issued for the same user when they changed, made for a new user otherwise.
        Returns (user public key, revoked-before time) when the user's older JWTs must be revoked."""
        creds = self.creds(name)
        if creds.exists() and user_ttl_s is None and _nats_claims(creds) == _wanted(perms):
            return None  # the same user with the same permissions: nothing to issue
        revoke: tuple[str, int] | None = None
        if creds.exists():
            user = user_of(creds)  # the same user, new permissions: a fresh JWT, the old ones revoked
            revoke = (user.public_key.decode(), int(time.time()) - 1)
        else:
            user = new_keypair(nkeys.PREFIX_BYTE_USER)
        _write_secret(creds, creds_text(user_jwt(acc, signing, user, perms, user_ttl_s), user))
        return revoke

    def _signing_key_of(self, name: str) -> Ed25519PrivateKey:
        """The key a principal signs messages with: the one on disk, else a new one written there."""
        key_path = self.signing_key(name)
        if key_path.exists():
            return load_private_key(key_path)
        key = new_signing_key()
        _write_secret(key_path, private_pem(key))
        return key

    def _write_trust_bundle(
        self, principals: dict[str, Principal], tenants: list[str], existing: TrustBundle | None
    ) -> None:
        """The trust bundle: every principal's key and every tenant auditor's (made once); its
        revision goes up when its content changed."""
        auditors = {t: bytes(_load_or_new_auditor(self.auditor_key(t)).public_key) for t in tenants}
        kek = read_key_file(self.data_key)
        held = existing.data_keys if existing else {}
        data_keys = {t: held[t] if t in held else wrap(kek, t, new_data_key()) for t in tenants}
        for t in tenants:  # the tenant's own copy, which its clients seal and open with
            if not self.tenant_data_key(t).exists():
                _write_secret(self.tenant_data_key(t), unwrap(kek, t, data_keys[t]).hex())
        bundle = TrustBundle(principals, auditors, existing.revision if existing else 0, data_keys)
        if existing is not None and bundle.dump() != existing.dump():
            bundle.revision += 1
        self.trust_bundle.write_text(bundle.dump())

    def tls_block(self, indent: str = "", routes: bool = False) -> str:
        """The ``tls {}`` block of a server config (client port; ``routes``: the cluster port, where
        each node also verifies its peers against the CA). Empty when no certificate was minted."""
        cert, key = self.tls_server
        if not cert.exists():
            return ""
        verify = f'\n{indent}  ca_file: "{self.tls_ca}"\n{indent}  verify: true' if routes else ""
        return (f'{indent}tls {{\n{indent}  cert_file: "{cert}"\n{indent}  key_file: "{key}"\n{indent}  timeout: 2'
                f"{verify}\n{indent}}}")  # fmt: skip

    def server_config(
        self, *, port: int, http_port: int, store_dir: Path, cluster: str = "", server_name: str = "agentmesh-local"
    ) -> str:
        """Operator-mode nats-server config: loopback only, durable JetStream writes.

        Self-contained (the operator and account JWTs are inline; they are signed, not secret),
        so it can be mounted into a container on its own."""
        preload = json.loads((self.secrets / "preload.json").read_text())
        sys_pub = json.loads((self.secrets / "account.json").read_text())["system"]
        entries = "\n".join(f"  {k}: {v}" for k, v in preload.items())
        return f"""# Generated by meshctl; do not edit. Secrets are not in this file.
server_name: {server_name}
listen: 127.0.0.1:{port}
http: 127.0.0.1:{http_port}
max_payload: 8MB
# A user JWT travels in the CONNECT line: the planner's (its permissions) is past the 4 KB default.
max_control_line: 16KB
{self.tls_block()}
operator: {(self.secrets / "operator.jwt").read_text().strip()}
system_account: {sys_pub}
resolver: MEMORY
resolver_preload: {{
{entries}
}}
jetstream {{
  store_dir: "{store_dir}"
  # Jepsen's 2025 NATS analysis: fsync every write on single-node and test servers.
  sync_interval: always
  max_memory_store: 256MB
  max_file_store: 8GB
}}
{cluster}"""
