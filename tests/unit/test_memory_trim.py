"""``mesh_host.memory.Trim``: freed heap handed back to the system on a timer."""

from __future__ import annotations

import asyncio
import gc

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
    assert calls == [] and off.report() == {"trim": "off"}
    none = Trim(30)
    none.trim = None
    assert none.once() == 0.0 and "unavailable" in none.report()["trim"]
