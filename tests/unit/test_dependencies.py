"""Backing-service dependencies: their state, the probe, and what they make of readiness."""

from __future__ import annotations

import pytest

from mesh_host.deps import Dependency, readiness

pytestmark = pytest.mark.unit


def _dep(name: str, required: bool, outcomes: list[bool] | None = None) -> Dependency:
    results = iter(outcomes or [])

    async def probe() -> None:
        if not next(results, True):
            raise ConnectionRefusedError(111, "Connection refused")

    return Dependency(name, probe, required=required, purpose=f"{name}'s job")


async def test_a_failed_probe_marks_it_down_and_a_good_one_up_again():
    dep = _dep("redis", required=True, outcomes=[False, False, True])
    changes: list[bool] = []
    dep.on_change = lambda d: changes.append(d.up)
    assert await dep.check() is False and not dep.up and "Connection refused" in dep.reason
    assert await dep.check() is False
    assert await dep.check() is True and dep.up and dep.reason == ""
    assert changes == [False, True], "one change each way, not one per failed probe"
    assert dep.failures == 2


def test_readiness_fails_only_on_a_required_dependency():
    cache, reservations = _dep("cache", required=False), _dep("redis", required=True)
    deps = {"cache": cache, "redis": reservations}
    assert readiness(deps) == (True, "ok")
    cache.down(TimeoutError("timed out"))
    assert readiness(deps) == (True, "degraded: cache unreachable, cache's job")
    reservations.down("Connection refused")
    ready, why = readiness(deps)
    assert not ready and why == "redis unreachable (Connection refused): needed for redis's job"
    reservations.ok()
    cache.ok()
    assert readiness(deps) == (True, "ok")


def test_an_exception_without_text_still_names_itself():
    dep = _dep("redis", required=False)
    dep.down(TimeoutError())
    assert dep.reason == "TimeoutError"
