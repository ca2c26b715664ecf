"""Spans are recorded when they can go somewhere; trace context travels either way."""

from __future__ import annotations

from opentelemetry import propagate, trace

from mesh_kit import telemetry as tel


def _span(monkeypatch, **env: str):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    t = tel.setup("planner")
    tracer = t.tracer_provider.get_tracer("test")
    span = tracer.start_span("handle task.submitted")  # never ended: nothing is exported
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    t.tracer_provider.shutdown()
    return span, carrier


def test_without_an_exporter_nothing_is_recorded_but_the_context_travels(monkeypatch):
    span, carrier = _span(monkeypatch)
    assert not span.is_recording()
    ctx = span.get_span_context()
    assert ctx.is_valid and carrier["traceparent"].split("-")[1] == f"{ctx.trace_id:032x}"


def test_an_exporter_or_an_explicit_sampler_records(monkeypatch):
    span, _ = _span(
        monkeypatch, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf"
    )
    assert span.is_recording()
    span, _ = _span(monkeypatch, OTEL_TRACES_SAMPLER="always_on")
    assert span.is_recording()
