"""``meshctl top``'s table, from a frame: each column counts what it names once."""

from __future__ import annotations

import pytest

from meshctl.top import Frame, _tenant, render

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
