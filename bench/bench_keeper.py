"""The keeper's pass and a tenant's export, against one real nats-server (file store, synced, as
the mesh runs it): what retention per tenant costs as the tenants with one grow.

Each tenant holds ``--per-tenant`` messages spread over the places its data classes live in
(streams and key-value records), stored as the mesh stores them; every tenant has a retention of
its own for all three classes. A pass with nothing due (the cut before every message: the
steady state, what most passes are) and a pass that removes everything are timed at each size,
as the keeper (its identity), in the same process tree; the table gives the cost per tenant and
its ratio to the smallest size (1.00: it grows linearly with the tenants). Then one tenant's
export: messages per second into the archive.

    python bench/bench_keeper.py [--tenants 10,100,1000] [--per-tenant 40]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from mesh_contracts import lifecycle
from mesh_contracts.v1.tenants import TenantRecord
from mesh_testing.infra import Infra, running_infra
from meshctl import export, keeper

DAY = 86400.0


def subject_of(place: lifecycle.Place, tenant: str, i: int) -> str:
    """A subject of ``place`` for ``tenant``, as the mesh would store one (its filter, filled in)."""
    parts = place.of(tenant).split(".")
    return ".".join("x" if p == "*" else p for p in parts[:-1]) + f".t{i}.e"


async def seed(infra: Infra, tenants: list[str], per_tenant: int) -> int:
    """``per_tenant`` messages of each tenant over every purgeable place, and its tenant record."""
    places = [p for c in lifecycle.DATA_CLASSES if c.purgeable for p in c.places() if p.stream != "ENVELOPES"]
    nc = await infra.admin()
    js = nc.jetstream()
    kv = await js.key_value("tenants")
    n = 0
    try:
        for t in tenants:
            for i in range(per_tenant):
                place = places[i % len(places)]
                await js.publish(subject_of(place, t, i), b'{"seeded": true}', stream=place.stream)
                n += 1
            keep = {"tasks": DAY, "tools": DAY, "usage": DAY}
            await kv.put(t, TenantRecord(tenant=t, retention_s=keep).to_bytes())
    finally:
        await nc.close()
    return n


async def keeper_pass(infra: Infra, now: float) -> tuple[float, keeper.KeeperReport]:
    nc = await keeper.connect(infra.ids, infra.nats_url)
    try:
        t0 = time.perf_counter()
        report = await keeper.enforce(nc, now=now, signer=None)
        return time.perf_counter() - t0, report
    finally:
        await nc.close()


async def timed_export(infra: Infra, tenant: str, out: Path) -> tuple[float, int]:
    nc = await infra.admin()
    try:
        t0 = time.perf_counter()
        manifest = await export.export(nc, tenant, out, infra.ids.trust_bundle.read_text())
        return time.perf_counter() - t0, sum(v for k, v in manifest["counts"].items() if k.startswith("places/"))
    finally:
        await nc.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tenants", default="10,100,1000", help="sizes, comma-separated")
    ap.add_argument("--per-tenant", type=int, default=40)
    args = ap.parse_args()
    sizes = [int(x) for x in args.tenants.split(",")]
    rows = []
    for size in sizes:
        with running_infra(["acme"], mode="binaries", name="bench-keeper") as infra:
            tenants = [f"t{i:05d}" for i in range(size)]
            t0 = time.perf_counter()
            seeded = asyncio.run(seed(infra, tenants, args.per_tenant))
            seed_s = time.perf_counter() - t0
            idle_s, idle = asyncio.run(keeper_pass(infra, time.time()))  # nothing a day old
            assert idle.purged == 0, idle
            full_s, full = asyncio.run(keeper_pass(infra, time.time() + 2 * DAY))
            assert not full.skipped and full.purged >= seeded, (full.purged, seeded, full.skipped)  # + ENVELOPES copies
            if size == sizes[0]:
                asyncio.run(seed(infra, ["exported"], 2000))
                with tempfile.TemporaryDirectory() as d:
                    ex_s, ex_n = asyncio.run(timed_export(infra, "exported", Path(d) / "x.tar.gz"))
            rows.append((size, seeded, seed_s, idle_s, full_s))
    base_idle, base_full = rows[0][3] / rows[0][0], rows[0][4] / rows[0][0]
    print(f"keeper pass, {args.per_tenant} messages a tenant over its places, each tenant with a retention of its own")
    print(f"{'tenants':>8} {'messages':>9} {'idle pass s':>12} {'ms/tenant':>10} {'ratio':>6} "
          f"{'removing pass s':>16} {'ms/tenant':>10} {'ratio':>6}")  # fmt: skip
    for size, seeded, _, idle_s, full_s in rows:
        print(f"{size:>8} {seeded:>9} {idle_s:>12.2f} {1000 * idle_s / size:>10.2f} {idle_s / size / base_idle:>6.2f} "
              f"{full_s:>16.2f} {1000 * full_s / size:>10.2f} {full_s / size / base_full:>6.2f}")  # fmt: skip
    print(f"export of one tenant: {ex_n} messages and records in {ex_s:.2f} s ({ex_n / ex_s:.0f} a second)")


if __name__ == "__main__":
    main()
