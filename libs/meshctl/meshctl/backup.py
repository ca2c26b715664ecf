"""Backing the mesh up and restoring it (``meshctl backup``, ``meshctl restore``; issue 42 item 5).

A backup is one tar file (0600: it holds every tenant's data and, with ``--identities``, the
keys), written whole or not at all:

- ``streams/<NAME>.snapshot``: each stream's JetStream snapshot, as the broker streams it
  (``$JS.API.STREAM.SNAPSHOT``: its messages, and its consumers with their positions), and
  ``streams/<NAME>.json``: the stream's configuration and state at that moment;
- ``identities/…`` (``--identities``): the mesh home's keys and credentials, the trust bundle
  and the tenant list: what a fresh machine needs to speak as the mesh again;
- ``manifest.json``: when, the order, each file's SHA-256.

**The order is the guarantee.** Snapshots are per stream, one after another, not one cut across
streams. They are taken so that what a later snapshot knows is never behind an earlier one: the
work streams first, then the buckets (the idempotency ledger, records, reservations), then the
audit chain's anchors, the audit chain last. A task restored mid-flight is redelivered from its
consumer's position; an effect performed after its stream's snapshot is in the ledger's, so the
redelivery finds it done instead of doing it again; and every anchor vouches for a chain at least
as long as the restored one.

**What is not in it.** Redis: the budget rebuilds its view from the ``reservations`` bucket and
the usage stream, the retrieval cache refills, rate limits start afresh. The side-effect sinks
(``OUTBOX``): they stand for the outside world, which a restore does not rewind.

``restore`` puts the streams back in the same order into a broker that does not hold them, or
(``--replace``) replaces each one it holds, as on a new machine where ``meshctl up`` provisioned
empty streams and started the services: they pick the restored consumers up where the backup left
them. Re-creating the AUDIT stream looks like tampering (records older than their stream), so the
restore leaves the admin's signed statement of it in the ``trust`` bucket, which ``meshctl audit
verify`` accepts (``meshctl.audit.created_vouched``).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from mesh_contracts import topology as topo
from mesh_identity import Signer
from meshctl import audit
from meshctl.identity import Identities
from meshctl.local import MeshError

CHUNK = 128 * 1024
AUDIT = topo.STREAMS["audit"]
VOUCH_TTL_S = 100 * 365 * 24 * 3600.0
"""A restore statement vouches for the past: it does not expire."""
TIMEOUT_S = 30.0
IDENTITY_FILES = ("trust-bundle.json", "tenants.json")


class BackupError(MeshError):
    """A backup or a restore could not be made (one line; nothing half-written is left)."""


def order(names: list[str]) -> list[str]:
    """The streams in backup (and restore) order; the sinks left out."""
    late = {f"KV_{b.name}" for b in topo.BUCKETS}
    last = [f"KV_{b}" for b in ("anchors",)] + [topo.STREAMS["audit"]]
    rank = {n: (2 if n in last else 1 if n in late else 0, last.index(n) if n in last else 0, n) for n in names}
    return sorted((n for n in names if n not in topo.SINKS), key=lambda n: rank[n])


async def _api(nc: NATS, subject: str, body: dict[str, Any] | None = None, timeout: float = TIMEOUT_S) -> Any:
    msg = await nc.request(subject, json.dumps(body).encode() if body is not None else b"", timeout=timeout)
    out = json.loads(msg.data or b"{}")
    if isinstance(out, dict) and "error" in out:
        raise BackupError(f"{subject}: {out['error'].get('description', out['error'])}")
    return out


async def stream_names(nc: NATS) -> list[str]:
    names: list[str] = []
    while True:
        page = await _api(nc, "$JS.API.STREAM.NAMES", {"offset": len(names)})
        names += page.get("streams") or []
        if not page.get("streams") or len(names) >= page.get("total", 0):
            return names


async def snapshot(nc: NATS, stream: str) -> tuple[dict[str, Any], bytes]:
    """One stream's snapshot: (its config and state, the snapshot's bytes)."""
    inbox = nc.new_inbox()
    chunks: asyncio.Queue[Any] = asyncio.Queue()

    async def got(msg: Any) -> None:
        await chunks.put(msg)

    sub = await nc.subscribe(inbox, cb=got)
    try:
        meta = await _api(nc, f"$JS.API.STREAM.SNAPSHOT.{stream}", {"deliver_subject": inbox, "chunk_size": CHUNK})
        out = io.BytesIO()
        while True:
            try:
                msg = await asyncio.wait_for(chunks.get(), TIMEOUT_S)
            except TimeoutError:
                raise BackupError(f"snapshot of {stream}: no chunk for {TIMEOUT_S:g} s") from None
            if not msg.data:  # the end (Status 204), or the server's error
                status = (msg.headers or {}).get("Status", "204")
                if status != "204":
                    raise BackupError(f"snapshot of {stream}: {status} {(msg.headers or {}).get('Description', '')}")
                break
            out.write(msg.data)
            if msg.reply:  # flow control: the next window
                await nc.publish(msg.reply, b"")
    finally:
        await sub.unsubscribe()
    return {"config": meta["config"], "state": meta["state"]}, out.getvalue()


async def restore_stream(nc: NATS, meta: dict[str, Any], data: bytes) -> dict[str, Any]:
    """Put one stream back from its snapshot; its state as the broker then reports it."""
    name = meta["config"]["name"]
    target = (await _api(nc, f"$JS.API.STREAM.RESTORE.{name}", meta))["deliver_subject"]
    for i in range(0, len(data), CHUNK):
        await nc.request(target, data[i : i + CHUNK], timeout=TIMEOUT_S)
    done = json.loads((await nc.request(target, b"", timeout=TIMEOUT_S * 4)).data or b"{}")
    if "error" in done:
        raise BackupError(f"restoring {name}: {done['error'].get('description', done['error'])}")
    return dict(done.get("state") or {})


@dataclass
class BackupReport:
    path: str
    at: float
    streams: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per stream: messages, bytes stored, snapshot bytes, consumers."""
    identities: int = 0
    seconds: float = 0.0


def _add(tar: tarfile.TarFile, name: str, data: bytes, sums: dict[str, str]) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
    tar.addfile(info, io.BytesIO(data))
    sums[name] = hashlib.sha256(data).hexdigest()


async def backup(nc: NATS, out: Path, ids: Identities | None = None) -> BackupReport:
    """Every stream (but the sinks) in order, and the identities when ``ids`` is given."""
    t0 = time.monotonic()
    report = BackupReport(path=str(out), at=time.time())
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.fchmod(fd, 0o600)
    sums: dict[str, str] = {}
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            names = order(await stream_names(nc))
            for name in names:
                meta, data = await snapshot(nc, name)
                if name == AUDIT:  # when its records may begin: what a restore vouches for
                    meta["created"] = await _chain_began(nc)
                _add(tar, f"streams/{name}.json", json.dumps(meta).encode(), sums)
                _add(tar, f"streams/{name}.snapshot", data, sums)
                st = meta["state"]
                report.streams[name] = {"messages": int(st.get("messages", 0)), "bytes": int(st.get("bytes", 0)),
                                        "snapshot_bytes": len(data), "consumers": int(st.get("consumer_count", 0))}  # fmt: skip
            if ids is not None:
                for path in identity_files(ids):
                    _add(tar, f"identities/{path.relative_to(ids.home)}", path.read_bytes(), sums)
                    report.identities += 1
            manifest = {"version": 1, "at": report.at, "order": names, "sha256": sums, "streams": report.streams}
            _add(tar, "manifest.json", json.dumps(manifest, indent=2).encode(), {})
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    report.seconds = time.monotonic() - t0
    return report


def identity_files(ids: Identities) -> list[Path]:
    """The home's secrets, the broker's TLS certificate and key, the CA every client trusts, the
    trust bundle and the tenant list."""
    tls = [ids.tls_ca, *ids.tls_server]
    files = sorted(p for p in ids.secrets.rglob("*") if p.is_file())
    files += [p for p in tls if p.exists() and p.is_relative_to(ids.home)]
    return files + [ids.home / n for n in IDENTITY_FILES if (ids.home / n).exists()]


def read(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A backup's manifest and files, every file checked against it."""
    try:
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"{path}: not a backup ({exc})") from None
    if "manifest.json" not in files:
        raise BackupError(f"{path}: not a backup (no manifest.json)")
    manifest = json.loads(files["manifest.json"])
    for name, digest in manifest["sha256"].items():
        if name not in files or hashlib.sha256(files[name]).hexdigest() != digest:
            raise BackupError(f"{path}: {name} does not match its manifest (damaged or altered): nothing restored")
    return manifest, files


async def _created(nc: NATS) -> float | None:
    info = await nc.jetstream().stream_info(AUDIT)
    return info.created.timestamp() if info.created else None


async def _chain_began(nc: NATS) -> float | None:
    """When the AUDIT stream's records may begin: its creation, or the one a restore vouched for."""
    from mesh_identity import TrustBundle, Verifier

    created, statement = await _created(nc), await audit.restored_statement(nc)
    if statement is None or created is None:
        return created
    stored = await (await nc.jetstream().key_value(topo.TRUST_BUCKET)).get(topo.TRUST_KEY)
    verifier = Verifier(TrustBundle.from_json(json.loads(stored.value or b"{}")["bundle"]))
    return audit.created_vouched(created, statement, verifier)[0]


async def vouch(nc: NATS, signer: Signer, was_created: float | None, backup_at: float) -> None:
    """The operator's signed statement that it re-created the AUDIT stream from a backup: its
    records older than the new stream are the backup's, not put back by someone else."""
    claims = {"stream": AUDIT, "created": await _created(nc), "was_created": was_created or backup_at,
              "backup_at": backup_at}  # fmt: skip
    kv = await nc.jetstream().key_value(topo.TRUST_BUCKET)
    await kv.put(audit.RESTORED_KEY, signer.statement(audit.RESTORED, claims, ttl_s=VOUCH_TTL_S).encode())


async def restore(
    nc: NATS, path: Path, *, replace: bool = False, only: list[str] | None = None, signer: Signer | None = None
) -> dict[str, Any]:
    """Every stream of the backup (or ``only`` those), in the backup's order; per stream what the
    broker then holds. With ``signer`` (the admin's key), a restored AUDIT stream is vouched for."""
    manifest, files = read(path)
    names = [n for n in manifest["order"] if only is None or n in only]
    present = set(await stream_names(nc))
    clash = [n for n in names if n in present]
    if clash and not replace:
        raise BackupError(f"the broker already holds {', '.join(clash[:6])}{'…' if len(clash) > 6 else ''}: "
                          "restore into an empty broker, or --replace (deletes them first)")  # fmt: skip
    out: dict[str, Any] = {}
    for name in names:
        if name in present:
            await _api(nc, f"$JS.API.STREAM.DELETE.{name}")
        meta = json.loads(files[f"streams/{name}.json"])
        t0 = time.monotonic()
        out[name] = await restore_stream(nc, {"config": meta["config"], "state": meta["state"]},
                                         files[f"streams/{name}.snapshot"])  # fmt: skip
        out[name]["seconds"] = round(time.monotonic() - t0, 3)
        if name == AUDIT and signer is not None:
            await vouch(nc, signer, meta.get("created"), float(manifest["at"]))
    return out


def restore_identities(path: Path, home: Path) -> int:
    """The backup's identities into ``home`` (refusing to overwrite a file there); how many."""
    _, files = read(path)
    ids = {n[len("identities/") :]: data for n, data in files.items() if n.startswith("identities/")}
    if not ids:
        raise BackupError(f"{path} holds no identities (it was made without --identities)")
    there = [n for n in ids if (home / n).exists()]
    if there:
        raise BackupError(f"{home} already holds {there[0]} (and {len(there) - 1} more): restore identities into an "
                          "empty home")  # fmt: skip
    for name, data in ids.items():
        target = home / name
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return len(ids)
