"""Checker: gives a verdict with per-check reasons on every candidate final answer."""

from __future__ import annotations

from mesh_checker.checks import run_checks
from mesh_contracts.v1 import CheckRequested, CheckVerdict
from mesh_kit import Delivery, Mesh


class Checker:
    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh

    def register(self) -> None:
        self.mesh.consume(CheckRequested, self.on_request)

    async def on_request(self, m: CheckRequested, d: Delivery) -> None:
        checks = run_checks(m)
        passed = all(c.passed for c in checks)
        failed = [c.name for c in checks if not c.passed]
        # The progress event first: the verdict ends the task, and a client following it stops
        # at the outcome, so an event published after the verdict could arrive too late to be seen.
        await self.mesh.progress(
            m.tenant,
            m.task_id,
            "check.verdict",
            "passed " + ", ".join(c.name for c in checks) if passed else "failed " + ", ".join(failed),
            key=str(m.attempt),
        )
        await self.mesh.publish(
            CheckVerdict(tenant=m.tenant, task_id=m.task_id, attempt=m.attempt, passed=passed, checks=tuple(checks)),
            key=str(m.attempt),
            causation=d.msg_id,
        )


async def build(mesh: Mesh) -> Checker:
    svc = Checker(mesh)
    svc.register()
    return svc
