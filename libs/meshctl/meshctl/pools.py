"""``meshctl pool``: worker pools (issue 48), dedicated worker deployments for heavy agents.

    meshctl pool add heavy                 # its identity (worker-heavy) and its own durables
    meshctl agent add cruncher --description ... --pool heavy --as author.acme.alice
    meshctl pool run heavy                 # a worker of the pool, in the foreground (Kubernetes:
                                           # the worker-pool component, one Deployment per pool)
    meshctl pool list                      # each pool's durables and how many steps wait there

A step of a profile that names a pool is published with the pool as a sixth subject token
(``step.v1.<tenant>.<task>.requested.<pool>``): only the pool's durable takes it, and it waits
there until one of the pool's workers runs (the shared workers' five-token filter never sees it).
The pool's workers sign as ``worker-<pool>`` (the worker's rights, on the pool's own durables);
its scaling follows its own durable's lag (KEDA).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any, NoReturn

import nats

from mesh_contracts import topology as topo
from mesh_identity import TrustBundle
from meshctl import options as opt
from meshctl.commands.common import nats_url
from meshctl.identity import Identities
from meshctl.local import MeshError, free_port, module_of, service_env
from meshctl.provision import provision_as_admin
from meshctl.rotation import publish_bundle


def pool_identity(ids: Identities, pool: str) -> dict[str, str]:
    """What makes a worker one of ``pool``'s: the pool, and its identity's credentials and key."""
    principal = topo.pool_principal(pool)
    return {"MESH_WORKER_POOL": pool, "MESH_PRINCIPAL": principal, "MESH_CREDS_FILE": str(ids.creds(principal)),
            "MESH_SIGNING_KEY_FILE": str(ids.signing_key(principal)), "OTEL_SERVICE_NAME": principal}  # fmt: skip


def pool_env(ids: Identities, url: str, pool: str, health_port: int) -> dict[str, str]:
    """A worker of ``pool``: the worker's settings, the pool's identity and durables."""
    return service_env(ids, topo.POOLED, url, health_port, pool_identity(ids, pool))


def cmd_add(args: argparse.Namespace) -> int:
    home = opt.home(args)
    ids = Identities(home)
    if not ids.exists():
        raise MeshError(f"{home} has no identities (meshctl up or meshctl init first)")
    known = args.pool in ids.pools()
    ids.mint(ids.tenants(), pools=[args.pool])  # its credentials and signing key; the others unchanged
    url = nats_url(args, home)
    asyncio.run(publish_bundle(ids, TrustBundle.from_file(ids.trust_bundle), url))
    asyncio.run(provision_as_admin(ids, url))  # every pool's durables, this one's included
    print(f"pool {args.pool}: {'already there' if known else 'added'}; identity {topo.pool_principal(args.pool)}, "
          f"durables {', '.join(d.name for d in topo.pool_durables(args.pool))}; run its workers: meshctl pool run {args.pool}")  # fmt: skip
    return 0


def cmd_run(args: argparse.Namespace) -> NoReturn:
    home = opt.home(args)
    ids = Identities(home)
    if args.pool not in ids.pools():
        raise MeshError(f"no pool {args.pool!r} (meshctl pool add {args.pool})")
    env = pool_env(ids, nats_url(args, home), args.pool, args.health_port or free_port())
    os.execve(sys.executable, [sys.executable, "-m", module_of(topo.POOLED)], env)  # noqa: S606 - our own worker, no shell


async def _lag(ids: Identities, url: str) -> list[dict[str, Any]]:
    nc = await nats.connect(url, name="meshctl-pools", **ids.connect_options("admin"))
    try:
        js, out = nc.jetstream(), []
        for pool in ids.pools():
            for d in topo.pool_durables(pool):
                try:
                    info = await js.consumer_info(d.stream, d.name, timeout=2.0)
                    waiting, taken = int(info.num_pending), int(info.num_ack_pending)
                except (nats.errors.TimeoutError, nats.js.errors.NotFoundError):
                    waiting = taken = -1
                out.append({"pool": pool, "durable": d.name, "pending": waiting, "ack_pending": taken})
        return out
    finally:
        await nc.close()


def cmd_list(args: argparse.Namespace) -> int:
    home = opt.home(args)
    ids = Identities(home)
    rows = asyncio.run(_lag(ids, nats_url(args, home))) if ids.pools() else []
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no worker pools (meshctl pool add NAME)")
    for r in rows:
        print(f"{r['pool']:<16} {r['durable']:<40} pending {r['pending']:>6}  in flight {r['ack_pending']:>6}")
    return 0


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    s = sub.add_parser("pool", help="worker pools: dedicated worker deployments for agent profiles")
    r = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)
    a = r.add_parser("add", help="a pool's identity (worker-<pool>) and its own durables")
    a.add_argument("pool", type=opt.pool_name)
    a.add_argument("--nats-url", default=None)
    a.set_defaults(fn=cmd_add)
    run = r.add_parser("run", help="a worker of the pool, in the foreground")
    run.add_argument("pool", type=opt.pool_name)
    run.add_argument("--nats-url", default=None)
    run.add_argument("--health-port", type=int, default=0)
    run.set_defaults(fn=cmd_run)
    ls = r.add_parser("list", help="each pool's durables: steps waiting and in flight")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--nats-url", default=None)
    ls.set_defaults(fn=cmd_list)
