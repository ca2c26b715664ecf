"""Hand memory the process has freed back to the system, on a timer (``MESH_MEMORY_TRIM_S``).

Why: measured in a soak (``bench/bench_soak.py``, 4,000 sample tasks at 8/s, glibc's
``mallinfo2`` and CPython's ``sys._debugmallocstats`` read every 30 s inside each service), the
worker's and the planner's resident memory grew about 2.5-3 MB per 1,000 tasks while their live
objects did not: Python's small-object arenas stayed full and flat, and so did the bytes
``malloc`` had handed out (20.3 MB in the worker, 24.1 in the planner, to 0.1 MB for 8
minutes). What grew was memory ``malloc`` had been given back and kept (the worker's free
bytes went from 0.9 to 11 MB): larger objects (message bodies, tokens, JSON) freed between
longer-lived ones leave holes that the heap keeps mapped. glibc returns such holes to the system
only at ``malloc_trim``; with it every 30 s the worker's resident memory stayed within 0.4 MB
over the same 8 minutes. Over the second half of a 10,000-task soak the planner then grew 0.28
MB per 1,000 tasks (2.81 without), the checker 0.03 (0.56), the worker none (0.15). Only whole
pages of a hole go back: the budget, whose holes are 3-16 KB, still grew about 1.6 MB per 1,000
(2.8 without).

The budget's holes came from glibc's *dynamic* mmap threshold (``MESH_MEMORY_MMAP_KIB``). A
block over the threshold (128 KiB at first) is mapped on its own when the heap has no room for it,
and unmapped when freed; but each such free raises the threshold to the freed block's size, and
the heap's trim threshold to twice that. From then on the budget's large transient blocks (such as its
monitor's tables of 4,800 tasks, batches of envelopes: hundreds of KiB, rebuilt and freed over and
over) were carved from the heap, which kept megabytes free at its top for them, and smaller
long-lived objects settled in the space they left. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``,
which turns the dynamic rise off and leaves the trim threshold at 128 KiB) grows the heap for no
block of that size: each is mapped, and unmapped when freed. With 64 KiB the budget's resident
memory over the steady half of an 8,000-task soak (600 s to 990 s, every table full) stayed
within 0.6 MB: 124.0 to 124.2 MB (+0.06 MB per 1,000 tasks; it grew 0.75 MB a minute without).

A trim costs a few milliseconds on the event loop (``last_ms`` and ``max_ms`` in ``/status``);
the C call releases the GIL, so the process's other threads run meanwhile. Where the C library
has no ``malloc_trim`` (musl, macOS) nothing is trimmed and ``/status`` says so.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mesh.memory")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_mb() -> float:
    """This process's resident memory in MB of 2**20 bytes, as VmRSS (0.0 where ``/proc`` is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return 0.0


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter: blocks at least this size are mapped on their own."""


def _libc(function: str) -> Any | None:
    """A function of the C library, or None where it has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        return getattr(libc, function)
    except (OSError, AttributeError):
        return None


def fix_mmap_threshold(kib: int) -> bool:
    """Map every block of ``kib`` KiB or more on its own, and unmap it when freed (glibc
    ``mallopt(M_MMAP_THRESHOLD)``, which also turns off the threshold's dynamic rise). 0 or a C
    library without ``mallopt``: nothing changes. True if set."""
    mallopt = _libc("mallopt") if kib > 0 else None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, kib * 1024))


def libc_trim() -> Callable[[], Any] | None:
    """glibc's ``malloc_trim(0)``, or None where the C library has none."""
    trim = _libc("malloc_trim")
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class Trim:
    """Every ``every_s`` seconds (0: never) give the freed heap back with ``trim``."""

    def __init__(self, every_s: float, trim: Callable[[], Any] | None = None, *, mmap_kib: int = 0) -> None:
        self.every_s = every_s
        self.trim = trim if trim is not None else libc_trim()
        self.mmap_kib = mmap_kib if fix_mmap_threshold(mmap_kib) else 0
        """The fixed mmap threshold in force (0: glibc's dynamic one)."""
        self.trims = 0
        self.released_mb = 0.0
        self.last_ms = self.max_ms = 0.0

    @property
    def on(self) -> bool:
        return self.every_s > 0 and self.trim is not None

    def once(self) -> float:
        """Trim now; the resident MB it gave back."""
        if self.trim is None:
            return 0.0
        before, t0 = resident_mb(), time.perf_counter()
        self.trim()
        ms = (time.perf_counter() - t0) * 1000
        released = max(0.0, before - resident_mb())
        self.trims += 1
        self.released_mb += released
        self.last_ms, self.max_ms = ms, max(self.max_ms, ms)
        return released

    async def run(self) -> None:
        if not self.on:
            return
        while True:
            await asyncio.sleep(self.every_s)
            try:
                self.once()
            except Exception as exc:  # noqa: BLE001 - never worth stopping a service for
                log.warning("memory trim failed (%s: %s); not trying again", type(exc).__name__, exc)
                return

    def report(self) -> dict[str, Any]:
        mmap = {"mmap_threshold_kib": self.mmap_kib or "dynamic"}
        if not self.on:
            return {
                "trim": "off" if self.trim is not None else "unavailable (no malloc_trim in this C library)",
                **mmap,
            }
        return {
            **mmap,
            "trim_every_s": self.every_s,
            "trims": self.trims,
            "released_mb": round(self.released_mb, 1),
            "last_ms": round(self.last_ms, 2),
            "max_ms": round(self.max_ms, 2),
            "resident_mb": round(resident_mb(), 1),
        }
