"""A tenant's data as a portable archive (issue 42, item 4: ``meshctl tenant export``), and the
offline check of its audit chain (``meshctl audit verify --archive``).

The archive is a gzipped tar of JSON files, readable with nothing but ``tar`` and a JSON parser:

- ``manifest.json``: the tenant, when, the format version, and each file's SHA-256 and count;
- ``places/<class>/<stream>.<n>.jsonl``: every message and record the mesh holds of the tenant,
  place by place (``mesh_contracts.lifecycle``: tasks, tools, usage, audit), exactly as stored:
  stream, sequence, time, subject, headers (the sender's signed identity token among them) and
  body (text, or base64 when it is not UTF-8);
  Where the body holds the tenant's content in sealed fields (``mesh_contracts.sealing``),
  ``opened`` gives it opened with the tenant's data key (the index's document versions, sealed
  whole in parts, are kept as stored: the documents are in the ingest messages);
- ``places/kept/<bucket>.jsonl``: what is kept until removed (documents and their index, notes,
  workflow definitions, releases);
- ``tasks.json``: each task with its submission time, outcome and how many messages it has;
- ``audit/anchors.jsonl`` and ``audit/stream.json``: the chain's anchors and the audit stream's
  first sequence and creation time, which ``verify`` holds the chain to;
- ``trust-bundle.json``: the public keys in force at export (the verifier's default; an auditor
  may bring their own, ``--trust-bundle``).

``verify_archive`` first checks every file against the manifest, then runs the same chain check
as ``meshctl audit verify`` on the archived records: a record altered, removed or reordered in the
archive breaks it, as in the stream.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from mesh_contracts import lifecycle
from mesh_contracts import topology as topo
from mesh_contracts.errors import ContractsError
from mesh_contracts.registry import open_body
from mesh_contracts.stored import SEALED_IN, open_stored
from mesh_durable.chain import Anchor, Verdict, verify
from mesh_durable.tail import Stored
from mesh_identity import TrustBundle, Verifier
from meshctl import audit
from meshctl.local import MeshError

FORMAT = 1
KEPT = {"rag": "{t}.>", "notes": "{t}.>", "workflows": "{t}.>", "releases": "{t}.>"}
"""Buckets whose tenant data is kept until removed (not a retention class), and its keys."""


class ArchiveError(MeshError):
    """The archive cannot be read, or does not match its manifest (one line)."""


def _row(s: Stored, stream: str, tenant: str) -> dict[str, Any]:
    try:
        body: dict[str, Any] = {"body": s.data.decode()}
    except UnicodeDecodeError:
        body = {"body_b64": base64.b64encode(s.data).decode()}
    if b'"$sealed"' in s.data:
        body["opened"] = _opened(s, stream, tenant)
    return {"stream": stream, "seq": s.seq, "time": s.time, "subject": s.subject, "headers": s.headers, **body}


def _opened(s: Stored, stream: str, tenant: str) -> Any:
    """The body with the tenant's content opened (it is stored sealed with the tenant's data key;
    ``body`` keeps the bytes the signatures and the chain are over), or why it does not open."""
    try:
        if stream.startswith("KV_"):
            return open_stored(s.data, s.subject.split(".", 2)[2], SEALED_IN.get(stream[3:], ""), tenant)
        return open_body(s.subject, s.data)
    except (ContractsError, ValueError) as exc:
        return f"(sealed: {exc})"


def _stored(row: dict[str, Any]) -> Stored:
    data = row["body"].encode() if "body" in row else base64.b64decode(row["body_b64"])
    return Stored(row["subject"], data, dict(row["headers"]), int(row["seq"]), float(row["time"]), 0)


@dataclass
class Export:
    tenant: str
    files: dict[str, bytes] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, rows: list[dict[str, Any]]) -> None:
        self.files[name] = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
        self.counts[name] = len(rows)

    def add_json(self, name: str, value: Any) -> None:
        self.files[name] = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()

    def write(self, out: Path, trust_bundle: str) -> dict[str, Any]:
        self.files["trust-bundle.json"] = trust_bundle.encode()
        at = time.time()
        manifest = {
            "format": FORMAT, "tenant": self.tenant, "exported_at": at, "counts": self.counts,
            "sha256": {n: hashlib.sha256(b).hexdigest() for n, b in sorted(self.files.items())},
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        with tarfile.open(tmp, "w:gz") as tar:
            for name, data in [("manifest.json", json.dumps(manifest, indent=2).encode()), *sorted(self.files.items())]:
                info = tarfile.TarInfo(f"{self.tenant}/{name}")
                info.size, info.mtime, info.mode = len(data), int(at), 0o600
                tar.addfile(info, io.BytesIO(data))
        tmp.chmod(0o600)
        tmp.replace(out)  # whole or not at all
        return manifest


async def export(nc: NATS, tenant: str, out: Path, trust_bundle: str) -> dict[str, Any]:
    """Write ``tenant``'s archive to ``out``; its manifest."""
    ex = Export(tenant)
    tasks: dict[str, dict[str, Any]] = {}
    for c in lifecycle.DATA_CLASSES:
        places = [*c.places(), *([lifecycle.STATUS] if c.name == "tasks" else [])]
        for i, place in enumerate(places):
            rows = [_row(s, place.stream, tenant) for s in await audit.stored(nc, place.stream, place.of(tenant))]
            ex.add(f"places/{c.name}/{place.stream}.{i}.jsonl", rows)
            for r in rows if place.stream in topo.STREAMS.values() else ():
                parts = r["subject"].split(".")
                t = tasks.setdefault(parts[3], {"task_id": parts[3], "messages": 0, "submitted_at": None,
                                                "outcome": None})  # fmt: skip
                t["messages"] += 1
                if parts[0] == "task" and parts[-1] == "submitted":
                    t["submitted_at"] = r["time"]
                if parts[0] == "task" and parts[-1] in ("completed", "failed", "rejected", "cancelled"):
                    t["outcome"] = parts[-1]
    for bucket, keys in KEPT.items():
        rows = [
            _row(s, f"KV_{bucket}", tenant)
            for s in await audit.stored(nc, f"KV_{bucket}", f"$KV.{bucket}.{keys.format(t=tenant)}")
        ]
        ex.add(f"places/kept/{bucket}.jsonl", rows)
    ex.add_json("tasks.json", sorted(tasks.values(), key=lambda t: (t["submitted_at"] or 0, t["task_id"])))
    ex.add("audit/anchors.jsonl", [{"statement": a.statement, "stored_at": a.stored_at}
                                   for a in await audit.anchors(nc, tenant)])  # fmt: skip
    info = await nc.jetstream().stream_info(topo.STREAMS["audit"])
    verifier = Verifier(TrustBundle.from_json(trust_bundle))
    created, restored = audit.created_vouched(info.created.timestamp() if info.created else None,
                                              await audit.restored_statement(nc), verifier)  # fmt: skip
    ex.add_json("audit/stream.json", {"first_seq": info.state.first_seq, "created": created,
                                      **({"restored": restored} if restored else {})})  # fmt: skip
    return ex.write(out, trust_bundle)


def read(path: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The archive's manifest and files, each checked against the manifest's hash."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            files = {}
            for m in tar.getmembers():
                f = tar.extractfile(m) if m.isfile() else None
                if f is not None:
                    files[m.name.split("/", 1)[1] if "/" in m.name else m.name] = f.read()
    except (OSError, tarfile.TarError) as exc:
        raise ArchiveError(f"{path}: not a readable archive ({exc})") from None
    try:
        manifest = json.loads(files.pop("manifest.json"))
    except (KeyError, ValueError):
        raise ArchiveError(f"{path}: no readable manifest.json") from None
    if manifest.get("format") != FORMAT:
        raise ArchiveError(f"{path}: archive format {manifest.get('format')!r}, this meshctl reads {FORMAT}")
    want = manifest.get("sha256", {})
    for name in sorted(set(want) | set(files)):
        if name not in files or name not in want or hashlib.sha256(files[name]).hexdigest() != want[name]:
            raise ArchiveError(f"{path}: {name} does not match the manifest (altered, added or missing)")
    return manifest, files


def verify_archive(path: Path, trust_bundle: str | None = None) -> tuple[dict[str, Any], Verdict]:
    """The archived audit chain checked offline, as ``meshctl audit verify`` checks the stream's."""
    manifest, files = read(path)
    tenant = manifest["tenant"]
    chain_files = sorted(n for n in files if n.startswith("places/audit/") and "/AUDIT." in n)
    records = [_stored(json.loads(line)) for n in chain_files for line in files[n].splitlines() if line.strip()]
    anchors = [
        Anchor(r["statement"], r["stored_at"]) for r in map(json.loads, files["audit/anchors.jsonl"].splitlines())
    ]
    stream = json.loads(files["audit/stream.json"])
    bundle = TrustBundle.from_json(trust_bundle if trust_bundle is not None else files["trust-bundle.json"])
    verdict = verify(tenant, records, Verifier(bundle), anchors, stream_first_seq=stream["first_seq"],
                     stream_created=stream["created"])  # fmt: skip
    return manifest, verdict
