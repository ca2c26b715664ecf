"""Golden-dataset evaluation (``meshctl eval DATASET``): every case of a dataset (``dataset``)
submitted to a running mesh as a tenant's task, followed to its outcome and held to the
properties its ``expect`` names (``properties``); the run becomes a report (``report``) that can
gate CI by itself (pass rate) or against an earlier report (``baseline``).

Public API::

    async def run_dataset(
        dataset_path: str | Path | Dataset,
        *,
        home: Path | None = None,                 # mesh home: the tenants' client identities
        clients: dict[str, TenantClient] | None = None,  # or connected clients, one per tenant
        concurrency: int = 4,
        timeout_s: float = 120.0,
        progress: bool | TextIO = True,           # True: stderr; a stream: there; False: quiet
        tags: Sequence[str] = (),                 # only cases with one of these tags
        case_ids: Sequence[str] = (),             # only these cases
        nats_url: str | None = None,              # with ``home``: instead of the running mesh's
        run_id: str | None = None,                # default: 8 random hex digits
        release: str = "",                        # every case runs this release of its tenant's behaviour
    ) -> dict                                      # the report
    Runner(mesh: Mesh, concurrency=4, timeout_s=120.0, progress=None, tty=None, run_id=..., grace_s=10.0)
        async run(dataset) -> list[dict]          # the report's case entries
    async def run_cases(dataset, runner) -> dict  # the report
    open_clients(home, tenants, *, nats_url=None) -> dict[str, TenantClient]   # not yet connected
    task_id_for(run_id, case_id) -> str

Errors an operator can fix are ``EvalError`` (``DatasetError`` for the files), one line each.

``clients`` given: they must already be connected (``async with client``) and are not closed
here; ``home`` given instead: a client per tenant is opened from the home's identities and the
running mesh's NATS URL, and closed at the end. The part that talks to the mesh is the
``Mesh`` protocol (``ingest`` and ``submit``); ``Runner`` runs cases through any ``Mesh``, which
is how the unit tests drive it with a fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from mesh_contracts.base import ID_PATTERN
from mesh_contracts.v1 import DOCUMENT_TYPES
from mesh_eval.dataset import Case, Dataset, load_dataset
from mesh_eval.errors import EvalError, one_line
from mesh_eval.properties import Observed, case_result
from mesh_eval.report import build_report

if TYPE_CHECKING:
    from meshctl.client import TenantClient


class Mesh(Protocol):
    """What the runner needs from a mesh."""

    async def ingest(self, tenant: str, documents: Sequence[tuple[str, Path]], timeout_s: float) -> None:
        """Ingest ``(doc id, file)`` pairs into ``tenant``; raise EvalError if one is not stored."""

    async def submit(self, case: Case, task_id: str, timeout_s: float) -> Observed:
        """Submit the case's task and follow it to its outcome (or ``timeout_s``)."""


@dataclass
class Runner:
    """Runs a dataset's cases through a ``Mesh``: documents first, then at most ``concurrency``
    tasks at a time; a case with no outcome after ``timeout_s`` (+ ``grace_s``, the time a
    client's last look at the stored outcome may take) is a ``timeout``."""

    mesh: Mesh
    concurrency: int = 4
    timeout_s: float = 120.0
    progress: TextIO | None = None
    tty: bool | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    grace_s: float = 10.0
    ingest_timeout_s: float = 120.0
    """Seconds to wait for each document (at least ``timeout_s``)."""

    async def ingest(self, dataset: Dataset, bar: Progress | None = None) -> None:
        by_tenant = dataset.documents()
        if not by_tenant:
            return
        count = sum(len(d) for d in by_tenant.values())
        if bar:
            bar.note(f"ingesting {count} document(s) into {len(by_tenant)} tenant(s): {', '.join(sorted(by_tenant))}")
        with tempfile.TemporaryDirectory(prefix="mesh-eval-") as tmp:
            pairs: dict[str, list[tuple[str, Path]]] = {}
            for tenant, docs in by_tenant.items():
                for n, doc in enumerate(docs):
                    path = doc.path
                    if path is None:  # inline: written out, so every document is ingested from a file
                        path = Path(tmp) / tenant / str(n) / doc.doc_id
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_bytes(doc.data())
                    pairs.setdefault(tenant, []).append((doc.doc_id, path))
            wait = max(self.timeout_s, self.ingest_timeout_s)
            await asyncio.gather(*(self.mesh.ingest(t, docs, wait) for t, docs in pairs.items()))

    async def run(self, dataset: Dataset) -> list[dict[str, Any]]:
        """Every case's report entry, in dataset order."""
        bar = Progress(len(dataset.cases), self.progress, tty=self.tty) if self.progress else None
        await self.ingest(dataset, bar)
        gate = asyncio.Semaphore(max(1, self.concurrency))
        ticker = asyncio.create_task(self._tick(bar)) if bar and bar.tty else None

        async def one(case: Case) -> dict[str, Any]:
            async with gate:
                tid = task_id_for(self.run_id, case.id)
                started = time.monotonic()
                try:
                    seen = await asyncio.wait_for(
                        self.mesh.submit(case, tid, self.timeout_s), self.timeout_s + self.grace_s
                    )
                except TimeoutError:
                    seen = Observed(None, time.monotonic() - started)
                except Exception as exc:  # noqa: BLE001 - one case's failure is its result, not the run's
                    seen = Observed(None, time.monotonic() - started, error=f"{type(exc).__name__}: {exc}")
                entry = case_result(case, tid, seen, timeout_s=self.timeout_s)
            if bar:
                bar.finished(entry)
            return entry

        try:
            if bar:
                bar.draw()
            return list(await asyncio.gather(*(one(c) for c in dataset.cases)))
        finally:
            if ticker:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            if bar:
                bar.close()

    @staticmethod
    async def _tick(bar: Progress) -> None:
        while True:
            await asyncio.sleep(1.0)
            bar.draw()


class ClientMesh:
    """The ``Mesh`` of connected tenant clients (one per tenant)."""

    def __init__(self, clients: dict[str, TenantClient], release: str = "") -> None:
        self.clients = clients
        self.release = release
        """A release of the tenant's behaviour every case runs (``meshctl release eval``)."""

    async def ingest(self, tenant: str, documents: Sequence[tuple[str, Path]], timeout_s: float) -> None:
        client = self.clients[tenant]
        for doc_id, path in documents:
            got = await client.ingest(doc_id, path.read_bytes(), DOCUMENT_TYPES[path.suffix.lower()], timeout=timeout_s)
            if got is None:
                raise EvalError(
                    f"ingest of {doc_id} into tenant {tenant}: no answer within {timeout_s:g}s "
                    "(is the rag service running?)"
                )
            if not got.ok:
                raise EvalError(f"ingest of {doc_id} into tenant {tenant} refused: {one_line(got.error)}")

    async def submit(self, case: Case, task_id: str, timeout_s: float) -> Observed:
        client = self.clients[case.tenant]
        kw: dict[str, Any] = {"task_id": task_id, "limits": case.limits, "follow": True, "timeout": timeout_s}
        if self.release:
            kw["release"] = self.release
        seen = await client.submit(case.goal, policy=case.policy, **kw)
        latency = seen.latency_s if seen.outcome is not None else time.time() - seen.submitted_at
        # the plan's steps that were dispatched (budget events also name the planning call and the judge)
        steps = list(dict.fromkeys(e.step_id for e in seen.events if e.step_id and e.stage == "step.dispatched"))
        return Observed(seen.outcome, latency, steps or None)


def open_clients(home: Path, tenants: Sequence[str], *, nats_url: str | None = None) -> dict[str, TenantClient]:
    """A (not yet connected) client per tenant, from the home's identities; EvalError when the
    mesh is not running or a tenant has no client identity there."""
    from meshctl.client import TenantClient
    from meshctl.identity import Identities
    from meshctl.local import MeshState

    ids = Identities(home)
    for tenant in tenants:
        if not ids.creds(f"client.{tenant}").exists():
            known = ", ".join(ids.tenants()) or "none"
            raise EvalError(
                f"tenant {tenant!r} has no client identity in {home} (known: {known}); provision it with "
                f"meshctl up --tenants {','.join(sorted({*ids.tenants(), *tenants}))} (or meshctl init --tenants "
                "and restart the mesh)"
            )
    if nats_url is None:
        state = MeshState.load(home)
        if state is None or not any(n.alive() for n in state.nats):
            raise EvalError(
                f"no mesh is running from {home} (start one with: meshctl up --tenants {','.join(tenants)})"
            )
        nats_url = state.nats_url
    return {t: TenantClient.of(ids, nats_url, t) for t in tenants}


async def run_dataset(
    dataset_path: str | Path | Dataset,
    *,
    home: Path | None = None,
    clients: dict[str, TenantClient] | None = None,
    concurrency: int = 4,
    timeout_s: float = 120.0,
    progress: bool | TextIO = True,
    tags: Sequence[str] = (),
    case_ids: Sequence[str] = (),
    nats_url: str | None = None,
    run_id: str | None = None,
    release: str = "",
) -> dict[str, Any]:
    """Run a dataset against a running mesh and return the report (see the module docstring).
    ``release``: every case runs that release of its tenant's behaviour (the cases of one tenant)."""
    dataset = dataset_path if isinstance(dataset_path, Dataset) else load_dataset(dataset_path)
    if tags or case_ids:
        dataset = dataset.select(tags=tags, case_ids=case_ids)
    stream = (sys.stderr if progress is True else None) if isinstance(progress, bool) else progress
    async with contextlib.AsyncExitStack() as stack:
        if clients is None:
            if home is None:
                raise EvalError("run_dataset needs a mesh home or connected clients")
            opened = open_clients(home, dataset.tenants, nats_url=nats_url)
            clients = {t: await stack.enter_async_context(c) for t, c in opened.items()}
        missing = [t for t in dataset.tenants if t not in clients]
        if missing:
            raise EvalError(f"no client for tenant {missing[0]!r} (clients given for: {', '.join(clients) or 'none'})")
        runner = Runner(ClientMesh(clients, release), concurrency=concurrency, timeout_s=timeout_s, progress=stream)
        if run_id:
            runner.run_id = run_id
        return await run_cases(dataset, runner)


async def run_cases(dataset: Dataset, runner: Runner) -> dict[str, Any]:
    """Run ``dataset`` with ``runner`` and build its report."""
    started = datetime.now(UTC)
    cases = await runner.run(dataset)
    return build_report(
        dataset,
        cases,
        run_id=runner.run_id,
        started_at=started,
        finished_at=datetime.now(UTC),
        concurrency=runner.concurrency,
    )


def task_id_for(run_id: str, case_id: str) -> str:
    """``ev-<run id>-<case id>`` within the id pattern; a case id that had to change (characters
    replaced, or cut to fit 64) gets a digest of itself appended, so ids stay distinct."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "-", case_id)
    tid = f"ev-{run_id}-{safe}"
    if safe != case_id or len(tid) > 64:
        tid = f"{tid[:55]}-{hashlib.sha256(case_id.encode()).hexdigest()[:8]}"
    assert re.match(ID_PATTERN, tid), tid
    return tid


class Progress:
    """Progress on a stream: one line redrawn in place on a terminal, one line per finished case
    otherwise (a CI log)."""

    WIDTH = 24

    def __init__(self, total: int, stream: TextIO, *, tty: bool | None = None) -> None:
        self.total, self.stream = total, stream
        self.tty = stream.isatty() if tty is None else tty
        self.done = self.passed = 0
        self.started = time.monotonic()

    def line(self) -> str:
        filled = int(self.WIDTH * self.done / self.total) if self.total else self.WIDTH
        return (
            f"eval [{'#' * filled}{'-' * (self.WIDTH - filled)}] {self.done:>{len(str(self.total))}}/{self.total}  "
            f"passed {self.passed}  failed {self.done - self.passed}  elapsed {time.monotonic() - self.started:.0f}s"
        )

    def draw(self) -> None:
        if self.tty:
            self.stream.write("\r" + self.line() + "\x1b[K")
            self.stream.flush()

    def note(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.draw()

    def finished(self, entry: dict[str, Any]) -> None:
        self.done += 1
        self.passed += bool(entry["passed"])
        if self.tty:
            self.draw()
            return
        failed = [k for k, p in entry["properties"].items() if not p["passed"]]
        self.stream.write(
            f"[{self.done}/{self.total}] {entry['id']} {'PASS' if entry['passed'] else 'FAIL'} "
            f"{entry['latency_s']:.1f}s ${entry['cost_usd']:.4f}"
            + (f" {entry['outcome']}: {', '.join(failed)}" if failed else "")
            + "\n"
        )
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.draw()
            self.stream.write("\n")
            self.stream.flush()
