"""``meshctl backup`` and ``meshctl restore`` (issue 42, item 5): see ``meshctl.backup``."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict
from pathlib import Path

from mesh_contracts import topology as topo
from mesh_identity import Signer, TrustBundle
from meshctl import backup
from meshctl import options as opt
from meshctl.commands.common import admin, nats_url
from meshctl.erase import purge
from meshctl.identity import Identities
from meshctl.local import MeshError
from meshctl.rotation import publish_bundle


def cmd_backup(args: argparse.Namespace) -> int:
    ids = Identities(opt.home(args))
    out: Path = args.out or Path(f"agentmesh-backup-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.tar")

    async def run() -> backup.BackupReport:
        nc = await admin(args)
        try:
            return await backup.backup(nc, out, ids if args.identities else None)
        finally:
            await nc.close()

    r = asyncio.run(run())
    if args.json:
        print(json.dumps(asdict(r), indent=2))
        return 0
    msgs = sum(s["messages"] for s in r.streams.values())
    size = sum(s["snapshot_bytes"] for s in r.streams.values())
    print(f"wrote {out}: {len(r.streams)} streams, {msgs} messages and records, {size / 1e6:.1f} MB of snapshots"
          + (f", {r.identities} identity files (keep it as secret as the keys)" if r.identities else "")
          + f", in {r.seconds:.1f} s")  # fmt: skip
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if not args.backup.exists():
        raise MeshError(f"no backup at {args.backup}")
    home = opt.home(args)
    if args.identities:
        n = backup.restore_identities(args.backup, home)
        print(f"restored {n} identity files into {home}: now start the broker (meshctl up, or the StatefulSet) "
              f"and run meshctl restore {args.backup} again without --identities")  # fmt: skip
        return 0
    t0 = time.monotonic()

    async def run() -> dict[str, dict[str, int]]:
        nc = await admin(args)
        try:
            ids = Identities(home)
            signer = Signer.from_file("admin", ids.signing_key("admin"))
            out = await backup.restore(nc, args.backup, replace=args.replace, only=args.stream or None, signer=signer)
            if f"KV_{topo.TRUST_BUCKET}" in out and ids.trust_bundle.exists():
                # The backup's bundle may predate a rotation, a revocation or an erasure (whose
                # tenant's data key it still holds): the home's bundle stands, and only it is kept.
                await publish_bundle(
                    ids, TrustBundle.from_file(ids.trust_bundle), nats_url(args, home), only_if_newer=True
                )
                await purge(nc, f"KV_{topo.TRUST_BUCKET}", f"$KV.{topo.TRUST_BUCKET}.{topo.TRUST_KEY}", keep=1)
            return out
        finally:
            await nc.close()

    done = asyncio.run(run())
    seconds = time.monotonic() - t0
    if args.json:
        print(json.dumps({"streams": done, "seconds": seconds}, indent=2))
        return 0
    msgs = sum(int(s.get("messages", 0)) for s in done.values())
    print(f"restored {len(done)} streams ({msgs} messages and records) from {args.backup} in {seconds:.1f} s: "
          "running services take them up where the backup left them (else: meshctl up); the budget rebuilds Redis")  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    s = sub.add_parser(
        "backup", help="snapshot every stream and bucket (and the identities) into one file (as the admin)"
    )
    s.add_argument("--out", type=Path, default=None, help="the file to write (default: agentmesh-backup-<time>.tar)")
    s.add_argument("--identities", action="store_true",
                   help="include the home's keys and credentials (what a fresh machine needs; keep the file secret)")  # fmt: skip
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_backup)
    s = sub.add_parser(
        "restore",
        help="put a backup's streams and buckets back into a broker (as the admin; --replace over what it holds)",
    )
    s.add_argument("backup", type=Path)
    s.add_argument("--identities", action="store_true",
                   help="first step on a fresh machine: only the backup's identities, into an empty --home")  # fmt: skip
    s.add_argument("--replace", action="store_true", help="delete a stream the broker holds before restoring it")
    s.add_argument("--stream", action="append", default=[], metavar="NAME", help="only this stream (repeatable)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--nats-url", default=None)
    s.set_defaults(fn=cmd_restore)
