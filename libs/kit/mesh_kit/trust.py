"""Identity that changes while a service runs: the trust bundle it judges tokens by, the key it
signs with and the NATS user it connects as, each replaced without a restart.

- The operator publishes each new bundle, signed, in KV ``trust``: it reaches every service at
  once on a core subscription to its key's subject (no consumer: a service holds no consumer
  rights) and by a re-read every ``MESH_IDENTITY_REFRESH_S``. It is accepted only if the
  current bundle's operator signed it and it is newer.
- A rotated signing key is picked up from its file once the bundle trusts it; rotated NATS
  credentials by reconnecting as soon as the file changed (before the old user is revoked).
- A token that names a key not known here yet makes ``verify_current`` read the bundle once and
  judge again (coalesced, spaced by ``TRUST_RECHECK_S``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import nats
from cryptography.hazmat.primitives import serialization
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import KeyNotFoundError

from mesh_contracts import topology as topo
from mesh_identity import IdentityError, Signer, TrustBundle, UnknownKey, Verifier, accepted_bundle, load_private_key
from mesh_kit import telemetry as tel
from mesh_kit.settings import ServiceSettings
from mesh_kit.state import KV, bind

log = logging.getLogger("mesh.trust")
V = TypeVar("V")
TRUST_RECHECK_S = 0.25
"""Least spacing of the trust-bundle reads made because a token named a key not known here."""


class Trust:
    """The service's signer and verifier of the moment, kept current (``follow`` from start on)."""

    def __init__(
        self,
        settings: ServiceSettings,
        nc: Callable[[], NATS],
        count: Callable[[str], None],
        *,
        signer: Signer | None = None,
        verifier: Verifier | None = None,
    ) -> None:
        self.settings = settings
        self._nc, self._count = nc, count
        self._key_file_state = _file_state(settings.signing_key_file) if signer is None else None
        self.me = settings.principal or settings.service  # who it signs as
        self.signer = signer or Signer.from_file(self.me, settings.signing_key_file, settings.token_ttl_s)
        self.verifier = verifier or Verifier(TrustBundle.from_file(settings.trust_bundle_file))
        self._creds_file_state = _file_state(settings.creds_file) if settings.creds_file else None
        self._tasks: list[asyncio.Task[None]] = []
        self._trust_kv: KV | None = None  # the ``trust`` bucket, once followed
        self._trust_lock = asyncio.Lock()
        self._trust_read_at = float("-inf")  # monotonic start of the last read on an unknown key

    def stop(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def follow(self) -> None:
        """Keep the trust bundle and this service's signing key current without a restart: the
        operator publishes each new bundle, signed, in KV ``trust`` (accepted only if the current
        bundle's operator signed it and it is newer); a rotated signing key is picked up from its
        file once the bundle trusts it. NATS credentials need nothing here: the client reads its
        creds file on every reconnect, and revoking the old user makes it reconnect."""
        kv = entry = None
        try:
            kv = bind(self._nc(), topo.TRUST_BUCKET)
            entry = await kv.get(topo.TRUST_KEY)
        except KeyNotFoundError:
            log.debug("no trust bundle published yet: the file's bundle stands")
        except Exception as exc:  # noqa: BLE001 - no bucket (older provisioning) or no permission
            log.warning("cannot follow published trust bundles (%s): the file's bundle stands", exc)
        if entry is not None and entry.value:
            self._accept_bundle(entry.value)
        if kv is not None:
            self._trust_kv = kv
            self._tasks.append(asyncio.create_task(self._watch_trust(kv)))
        if self._key_file_state is not None:
            self._tasks.append(asyncio.create_task(self._watch_key()))

    def _accept_bundle(self, document: bytes) -> bool:
        try:
            new = accepted_bundle(self.verifier.bundle, document, self.verifier.leeway_s)
        except IdentityError as exc:
            if "not newer" not in str(exc):
                self._count(tel.M_TRUST_REFUSED)
                log.error("refused a published trust bundle: %s", exc)
            return False
        self.verifier.bundle = new.attach(self.verifier.tenants)
        self._count(tel.M_TRUST_UPDATED)
        log.info("trust bundle revision %d in force", new.revision)
        self._reload_key()
        return True

    async def _newer_trust(self, failed_at: float) -> bool:
        """After a token failed with ``UnknownKey`` at ``failed_at`` (monotonic): read the published
        bundle and say whether a newer one is now in force. A rotation publishes the bundle before
        anyone signs with the new key, but a process may see a message signed with it before its
        own copy of the bundle arrives (it was reconnecting when the write went by, and re-reads
        only every ``identity_refresh_s``). Reads are coalesced and spaced: one read answers every
        failure that happened before it started, and the next waits ``TRUST_RECHECK_S`` after it,
        so a flood of forged tokens costs a few reads a second, not one each."""
        if self._trust_kv is None:
            return False
        before = self.verifier.bundle
        async with self._trust_lock:
            if self.verifier.bundle is not before:
                return True
            if self._trust_read_at >= failed_at:
                return False  # a read that started after this failure found nothing newer
            pause = self._trust_read_at + TRUST_RECHECK_S - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            self._trust_read_at = time.monotonic()
            try:
                await self._read_published(self._trust_kv)
            except Exception as exc:  # noqa: BLE001 - the broker is away
                log.debug("trust bundle read on an unknown key failed (%s)", exc)
        return self.verifier.bundle is not before

    async def _read_published(self, kv: KV) -> None:
        """Read the published bundle (one get) and accept it if it is newer; none published is no error."""
        with contextlib.suppress(KeyNotFoundError):
            entry = await asyncio.wait_for(kv.get(topo.TRUST_KEY), 2.0)
            if entry.value:
                self._accept_bundle(entry.value)

    async def newest_trust(self) -> TrustBundle:
        """The trust bundle as last published, read now (one get), for a decision that must not
        rest on a copy that may be a moment old: whom a tenant has named to approve its calls, or
        removed. Without a published bundle (or a ``trust`` bucket) the bundle in force is it; a
        failed read raises, so the decision is retried rather than taken on old trust."""
        if self._trust_kv is not None:
            await self._read_published(self._trust_kv)
        return self.verifier.bundle

    async def verify_current(self, check: Callable[[], V]) -> V:
        """``check()`` (a verification against ``self.verifier``), judged again under the newest
        published bundle if it failed on a key this process does not know yet. Every message the
        mesh hands a handler went through it; a handler verifying what a message carries (a
        record signed by another service) uses it too."""
        try:
            return check()
        except UnknownKey:
            if not await self._newer_trust(time.monotonic()):
                raise
            self._count(tel.M_TRUST_CAUGHT_UP)
        return check()

    async def _watch_trust(self, kv: KV) -> None:
        """Every write of the bundle reaches this service at once on a core subscription to its
        key's subject (the document itself, accepted only if the current bundle's operator
        signed it and it is newer); a re-read every ``identity_refresh_s`` catches a write made
        while this service was disconnected. No consumer: a service holds no consumer rights."""

        async def on_write(msg: Msg) -> None:
            if msg.data:  # a deletion marker has no body
                self._accept_bundle(msg.data)

        sub = None
        try:
            while True:
                try:
                    if sub is None:
                        sub = await self._nc().subscribe(f"$KV.{topo.TRUST_BUCKET}.{topo.TRUST_KEY}", cb=on_write)
                    await self._read_published(kv)
                except Exception as exc:  # noqa: BLE001 - the broker went away (or a reconnect): read again
                    log.debug("trust bundle re-read failed (%s); trying again", exc)
                await asyncio.sleep(self.settings.identity_refresh_s)
        finally:
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()

    async def _watch_key(self) -> None:
        while True:
            await asyncio.sleep(self.settings.identity_refresh_s)
            self._reload_key()
            await self._reload_creds()

    async def _reload_creds(self) -> None:
        """Reconnect as the new NATS user as soon as a rotation replaced the creds file (the client
        reads the file on every connect), before the old user is revoked: a revoked connection is
        closed by the server for good, a reconnect on our own initiative costs nothing."""
        if self._creds_file_state is None or self.settings.creds_file is None:
            return
        state = _file_state(self.settings.creds_file)
        if state is None or state == self._creds_file_state:
            return
        self._creds_file_state = state
        try:
            await self._nc().force_reconnect()
        except (AttributeError, nats.errors.Error) as exc:
            log.warning("could not reconnect with the rotated credentials yet (%s)", exc)
            self._creds_file_state = None
            return
        self._count(tel.M_CREDS_ROTATED)
        log.info("reconnected with the rotated NATS credentials")

    def _reload_key(self) -> None:
        """Sign with the key in the signing-key file once it changed *and* the bundle trusts it (a
        key written before its bundle is published waits; the old key keeps signing meanwhile)."""
        if self._key_file_state is None:
            return
        state = _file_state(self.settings.signing_key_file)
        if state == self._key_file_state or state is None:
            return
        try:
            key = load_private_key(self.settings.signing_key_file)
        except (OSError, ValueError, IdentityError) as exc:
            log.warning("signing key file unreadable (%s); still signing with the current key", exc)
            return
        principal = self.verifier.bundle.principals.get(self.me)
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        trusted = principal is not None and any(
            k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) == public
            for k in principal.active()
        )
        if not trusted:
            return  # not in the bundle yet: keep the old key until it is
        self.signer = Signer(self.me, key, self.settings.token_ttl_s)
        self._key_file_state = state
        self._count(tel.M_KEY_ROTATED)
        log.info("signing with the rotated key")


def _file_state(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file: a rotation replaces the file, which changes both."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns
