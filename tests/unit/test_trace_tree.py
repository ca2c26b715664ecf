"""``meshctl trace``'s pieces: the W3C trace context, the span tree, the Jaeger answer."""

from __future__ import annotations

import pytest

from mesh_testing.otlp import TraceBackend
from meshctl import trace as tr

pytestmark = pytest.mark.unit

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{TRACE}-00f067aa0ba902b7-01", (TRACE, "00f067aa0ba902b7", True)),
        (f"00-{TRACE}-00f067aa0ba902b7-00", (TRACE, "00f067aa0ba902b7", False)),
        ("", None),
        ("garbage", None),
        (f"00-{TRACE}-0000000000000000-01", None),  # an all-zero id is invalid
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE[:-1]}-00f067aa0ba902b7-01", None),
        (f"00-{TRACE}-00f067aa0ba902b7-zz", None),
    ],
)
def test_traceparent(value, expected):
    assert tr.parse_traceparent(value) == expected


def _span(span_id: str, parent: str, start: int, service: str = "worker", error: bool = False) -> tr.Span:
    return tr.Span(span_id, parent, service, f"op-{span_id}", start, 10, "consumer", error)


def test_spans_nest_under_their_parents_and_orphans_become_roots():
    spans = [_span("c", "a", 3), _span("a", "", 1), _span("b", "a", 2), _span("x", "missing", 0)]
    roots = tr.tree(spans)
    assert [r.span_id for r in roots] == ["x", "a"]
    assert [c.span_id for c in roots[1].children] == ["b", "c"], "children by start time"
    assert [r.span_id for r in tr.tree(spans)] == ["x", "a"] and len(roots[1].children) == 2, "idempotent"


def test_rendered_tree_marks_errors_and_sums_handler_time():
    spans = [_span("a", "", 1_000, "planner"), _span("b", "a", 2_000, "worker", error=True)]
    out = tr.render_spans("acme", "t1", [TRACE], spans)
    assert "2 spans, 2 services" in out and "op-b  ERROR" in out
    assert "time in handlers, by service: planner 0.0 ms, worker 0.0 ms" in out
    assert "no span" in tr.render_spans("acme", "t1", [TRACE], [])


def test_jaeger_answers_are_read_and_failures_are_one_line_errors():
    backend = TraceBackend().start()
    try:
        assert tr.fetch_jaeger(backend.query_url, TRACE) == [], "an unknown trace is empty, not an error"
        backend.spans[TRACE] = [
            {"traceID": TRACE, "spanID": "a" * 16, "operationName": "root", "references": [], "startTime": 5,
             "duration": 7, "tags": [{"key": "span.kind", "value": "consumer"}], "processID": "planner"},
            {"traceID": TRACE, "spanID": "b" * 16, "operationName": "child",
             "references": [{"refType": "CHILD_OF", "traceID": TRACE, "spanID": "a" * 16}], "startTime": 6,
             "duration": 1, "tags": [{"key": "error", "value": True}], "processID": "worker"},
        ]  # fmt: skip
        spans = tr.fetch_jaeger(backend.query_url, TRACE)
        assert [(s.service, s.name, s.parent_id, s.error) for s in spans] == [
            ("planner", "root", "", False),
            ("worker", "child", "a" * 16, True),
        ]
    finally:
        backend.stop()
    with pytest.raises(tr.BackendError, match="cannot reach the trace backend"):
        tr.fetch_jaeger(backend.query_url, TRACE, timeout_s=1)
