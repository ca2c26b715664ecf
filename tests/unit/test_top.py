"""``meshctl top``'s table, from a frame: each column counts what it names once."""

from __future__ import annotations

import pytest

from meshctl.top import Frame, _tenant, add_restarts, render

pytestmark = pytest.mark.unit


def _row(out: str, tenant: str) -> dict[str, str]:
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("TENANT"))
    names = ["TENANT", "IN FLIGHT", "RUNNING", "QUEUED", "DONE", "FAILED", "REFUSED", "APPROVALS", "TOKENS TODAY",
             "SPEND TODAY"]  # fmt: skip
    assert all(n in header for n in names)
    row = next(line for line in lines if line.startswith(tenant))
    # "IN FLIGHT", "TOKENS TODAY" and "SPEND TODAY" are one column each
    return dict(zip(names, row.split(), strict=True))


def test_refused_counts_each_refusal_once():
    """Three submissions refused at admission are in the admission record (``refused``) and, as
    three stored ``task.rejected``, in the TASK stream (``rejected``): the column says 3, as the
    dashboard does, not 6."""
    frame = Frame(at=0.0)
    t = _tenant(frame, "acme")
    t.update(refused=3, rejected=3, completed=2)
    assert _row(render(frame), "acme")["REFUSED"] == "3"
    assert _row(render(frame), "acme")["DONE"] == "2"


def test_restarts_show_on_a_supervised_mesh_only():
    """A local mesh under its supervisor: each service's restarts, and a state that is not
    ``running``; replicas (``worker-2``) count under their service. No supervisor, no column."""
    frame = Frame(at=0.0)
    frame.services["worker"] = {"pending": 0, "in_flight": 0, "redelivered": 0, "per_s": 0.0}
    assert "RESTARTS" not in render(frame)
    add_restarts(frame, {"worker": (1, "running"), "worker-2": (2, "running"), "checker": (5, "crash-looping")})
    lines = render(frame).splitlines()
    assert next(line for line in lines if line.startswith("SERVICE")).endswith("RESTARTS")
    assert next(line for line in lines if line.startswith("worker")).split()[-1] == "3"
    assert next(line for line in lines if line.startswith("checker")).split()[-2:] == ["5", "crash-looping"]


def test_each_tool_server_replica_has_a_row_with_its_health_and_failovers():
    """Tenants' tool servers (issue 44): one row per replica, its health, breaker, load and
    failovers as the tool-executor last wrote them; none at all on a mesh without any."""
    frame = Frame(at=0.0)
    assert "TOOL SERVER" not in render(frame)
    frame.endpoints = [
        {"tenant": "acme", "server": "orders", "url": "http://10.0.0.7:8731/mcp", "healthy": True,
         "breaker": "closed", "in_flight": 2, "calls": 40, "failures": 1, "failovers": 1, "latency_ms": 3.4},
        {"tenant": "acme", "server": "orders", "url": "http://10.0.0.8:8731/mcp", "healthy": False,
         "breaker": "open", "in_flight": 0, "calls": 9, "failures": 5, "failovers": 4, "latency_ms": 0.0},
    ]  # fmt: skip
    lines = render(frame).splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("TOOL SERVER"))
    up, down = lines[header + 1].split(), lines[header + 2].split()
    assert up[:4] == ["acme/orders", "http://10.0.0.7:8731/mcp", "up", "closed"] and up[4:8] == ["2", "40", "1", "1"]
    assert down[2:4] == ["DOWN", "open"] and down[7] == "4"
