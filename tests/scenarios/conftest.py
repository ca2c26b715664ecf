"""Expose each test's outcome to fixtures, and dump the services' logs when a scenario fails."""

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(autouse=True)
def logs_on_failure(request):
    """A chaos failure is only useful with the services' own account of it."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is None or not rep.failed:
        return
    for name in ("infra", "cluster"):
        if name in request.fixturenames:
            home = request.getfixturevalue(name).home
            for log in sorted((home / "logs").glob("*.log")):
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"\n--- {log.name} (last {len(tail)} lines)\n" + "\n".join(line[:240] for line in tail))
