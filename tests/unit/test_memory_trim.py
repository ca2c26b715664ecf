"""``mesh_host.memory.Trim``: freed heap handed back to the system on a timer."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys

import pytest

from mesh_host.memory import Trim, libc_trim, resident_mb


@pytest.mark.skipif(libc_trim() is None, reason="this C library has no malloc_trim (musl, macOS): nothing to trim")
def test_a_trim_gives_back_the_holes_that_freed_objects_leave_between_live_ones():
    # 60,000 bodies of 1 KB (beyond Python's small-object allocator, so malloc's), one in 16
    # kept: what is freed is ~56 MB of holes between live bodies, which free() alone keeps.
    kept, freed = [], []
    for i in range(60_000):
        (kept if i % 16 == 0 else freed).append(bytes(1000) + bytes([i % 256]))
    freed.clear()
    gc.collect()
    before = resident_mb()
    trim = Trim(30)
    released = trim.once()
    assert released >= 10, f"only {released:.1f} MB of ~56 MB of holes given back"
    assert resident_mb() < before - 10
    assert len(kept) == 3750 and all(len(b) == 1001 for b in kept), "the live bodies are untouched"
    report = trim.report()
    assert report["trims"] == 1 and report["released_mb"] >= 10 and report["max_ms"] >= report["last_ms"] > 0


async def test_it_trims_on_its_timer_and_stops_trying_after_a_failure(caplog):
    calls = []

    def fake() -> None:
        calls.append(1)
        if len(calls) == 3:
            raise OSError("simulated")

    trim = Trim(0.01, trim=fake)
    await asyncio.wait_for(trim.run(), timeout=5)  # returns: the third trim failed, and it gave up
    assert len(calls) == 3 and trim.trims == 2
    assert "memory trim failed (OSError: simulated)" in caplog.text


async def test_off_and_unavailable_trim_nothing_and_say_why():
    calls = []
    off = Trim(0, trim=lambda: calls.append(1))
    await asyncio.wait_for(off.run(), timeout=1)
    assert calls == [] and off.report() == {"trim": "off", "mmap_threshold_kib": "dynamic"}
    none = Trim(30)
    none.trim = None
    assert none.once() == 0.0 and "unavailable" in none.report()["trim"]


PROBE = """
import ctypes, json, sys
from mesh_host.memory import Trim
libc = ctypes.CDLL("libc.so.6")
class MI(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MI
trim = Trim(30, mmap_kib=int(sys.argv[1]))  # as a service starts
fixed = trim.mmap_kib > 0
mapped = []
for _ in range(3):  # a large transient block, allocated and freed again and again
    block = bytearray(4 << 20)
    mapped.append(libc.mallinfo2().hblkhd)
    del block
print(json.dumps({"fixed": fixed, "mapped": mapped, "after": libc.mallinfo2().hblkhd,
                  "report": trim.report()["mmap_threshold_kib"]}))
"""


@pytest.mark.skipif(libc_trim() is None, reason="not glibc: no mallopt thresholds to set")
def test_a_fixed_mmap_threshold_keeps_large_transient_blocks_out_of_the_heap_every_time():
    """glibc's dynamic threshold maps the first 4 MiB block on its own, then, having seen it freed,
    rises above it (and the heap keeps twice that free at its top): the next ones are carved from
    the heap. With the threshold fixed (what every service does, ``MESH_MEMORY_MMAP_KIB``) each one
    is mapped, and unmapped when freed. In a subprocess: the setting is process-wide."""

    def run(kib: int) -> dict:
        out = subprocess.run([sys.executable, "-c", PROBE, str(kib)], capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    dynamic, fixed = run(0), run(64)
    assert not dynamic["fixed"] and fixed["fixed"]
    base = fixed["after"]
    assert all(m >= base + (4 << 20) for m in fixed["mapped"]), fixed  # each block mapped on its own ...
    assert fixed["after"] < min(fixed["mapped"])  # ... and unmapped when freed
    assert dynamic["mapped"][0] >= dynamic["after"] + (4 << 20), dynamic  # dynamic: the first one mapped,
    assert all(m < dynamic["after"] + (4 << 20) for m in dynamic["mapped"][1:]), dynamic  # the next the heap's
    assert fixed["report"] == 64 and dynamic["report"] == "dynamic", "/status says which is in force"
