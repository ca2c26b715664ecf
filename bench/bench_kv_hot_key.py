"""Compare-and-set on one hot key from one process: racing handlers, handlers taking turns.

A planner replica writes a task's record on every step event, and its admission record per
tenant on every submission: several handlers of one process update the same key at once.
``mesh_kit.state.update`` makes them take turns (a lock per key); without it (``state._update``)
they start from the same remembered value and the losers pay a failed write, a read and a retry.
Both run here against one real nats-server (file store, ``sync_interval: always``, as the mesh
runs it), in the same process tree, alternated, and the table gives the ratios.

    python bench/bench_kv_hot_key.py [--updates 400] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from pydantic import BaseModel

from mesh_kit import state as st
from meshctl.local import find_binary, free_port

MODES = ("racing", "taking turns")
"""``state._update`` (no lock), ``state.update`` (a lock per key)."""


class Day(BaseModel):
    calls: int = 0
    tokens: int = 0


class Counting:
    """The bucket, counting what each update costs the server: reads, writes, refused writes."""

    def __init__(self, kv: Any) -> None:
        self.kv, self.reads, self.writes, self.refused, self.gave_up = kv, 0, 0, 0, 0

    async def get(self, key: str) -> Any:
        self.reads += 1
        return await self.kv.get(key)

    async def create(self, key: str, value: bytes) -> int:
        self.writes += 1
        try:
            return await self.kv.create(key, value)
        except KeyWrongLastSequenceError:
            self.refused += 1
            raise

    async def update(self, key: str, value: bytes, last: int) -> int:
        self.writes += 1
        try:
            return await self.kv.update(key, value, last=last)
        except KeyWrongLastSequenceError:
            self.refused += 1
            raise


async def _quiet(_exc: Exception) -> None:
    """Not listening yet: the loop below tries again."""


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(nc: nats.NATS, server: int, name: str, mode: str, n: int, concurrency: int) -> dict:
    js = nc.jetstream()
    kv = Counting(await js.create_key_value(KeyValueConfig(bucket=name, storage=StorageType.FILE, history=1)))

    def add(cur: Day | None) -> Day:
        cur = cur or Day()
        return Day(calls=cur.calls + 1, tokens=cur.tokens + 100)

    left = iter(range(n))

    async def handler() -> None:
        for _ in left:
            if mode == "racing":
                while True:
                    try:
                        await st._update(kv, "day", Day, add, 12)
                        break
                    except st.Conflict:  # lost 12 times in a row: a handler's message would be redelivered
                        kv.gave_up += 1
            else:
                await st.update(kv, "day", Day, add)

    cpu0, srv0, t0 = time.process_time(), cpu_s(server), time.perf_counter()
    await asyncio.gather(*(handler() for _ in range(concurrency)))
    wall, cpu, srv = time.perf_counter() - t0, time.process_time() - cpu0, cpu_s(server) - srv0
    try:
        final = Day.model_validate_json((await kv.kv.get("day")).value)
    except KeyNotFoundError:
        final = Day()
    assert final.calls == n, f"{name}: {final.calls} of {n} updates kept"  # nothing lost either way
    return {"wall": wall, "cpu": cpu, "srv": srv, "reads": kv.reads, "writes": kv.writes, "refused": kv.refused,
            "gave_up": kv.gave_up}  # fmt: skip


async def measure(port: int, server_pid: int, n: int, concurrency: int) -> dict[str, dict[str, float]]:
    for _ in range(100):
        try:
            nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=1, max_reconnect_attempts=0,
                                    error_cb=_quiet)  # fmt: skip
            break
        except Exception:  # noqa: BLE001 - not listening yet
            await asyncio.sleep(0.05)
    else:
        raise SystemExit("nats-server did not start")
    rows: dict[str, dict[str, float]] = {}
    for rnd in range(2):  # alternated (AB BA): drift on a shared machine falls on every mode
        for i, label in enumerate(MODES if rnd % 2 == 0 else MODES[::-1]):
            r = await run(nc, server_pid, f"hot{rnd}{i}", label, n, concurrency)
            acc = rows.setdefault(label, dict.fromkeys(r, 0.0))
            for k, v in r.items():
                acc[k] += v
    await nc.close()
    return rows


def main(n: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        conf = Path(tmp) / "nats.conf"
        conf.write_text(f"port: {port}\njetstream {{\n  store_dir: {tmp}/js\n  sync_interval: always\n}}\n")
        server = subprocess.Popen([find_binary("nats-server"), "-c", str(conf)], stderr=subprocess.DEVNULL)
        try:
            rows = asyncio.run(measure(port, server.pid, n, concurrency))
        finally:
            server.terminate()
            server.wait()
    total = 2 * n
    print(f"{n} updates x2 of one key, {concurrency} handlers at once, one process (nats-server, sync always):")
    print(f"  {'':14} {'updates/s':>9} {'writes/upd':>10} {'refused':>8} {'gave up':>7} {'reads/upd':>9} "
          f"{'client CPU':>10} {'server CPU':>10}")  # fmt: skip
    for label in MODES:
        r = rows[label]
        print(f"  {label:14} {total / r['wall']:9.0f} {r['writes'] / total:10.2f} {int(r['refused']):8d} "
              f"{int(r['gave_up']):7d} {r['reads'] / total:9.2f} {r['cpu'] * 1000 / total:8.3f}ms "
              f"{r['srv'] * 1000 / total:8.3f}ms")  # fmt: skip
    race = rows["racing"]
    for label in MODES[1:]:
        r = rows[label]
        print(f"  {label} / racing: {race['wall'] / r['wall']:.2f}x the throughput, "
              f"{r['cpu'] / race['cpu']:.2f}x the client CPU, {r['srv'] / race['srv']:.2f}x the server CPU")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    if a.updates < 1 or a.concurrency < 1:
        ap.error("--updates and --concurrency must be at least 1")
    main(a.updates, a.concurrency)
