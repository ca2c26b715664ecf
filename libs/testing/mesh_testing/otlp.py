"""A telemetry backend for tests: OTLP/gRPC in (what the services' real exporters send to a
collector: spans and metrics), Jaeger's query API out (what ``meshctl trace --jaeger`` reads),
and the metrics' latest data points for a test to look at (``points``).

Neither an OpenTelemetry Collector nor Jaeger can be installed here from PyPI, so this stands
in for the pair at that boundary. It speaks both protocols as specified: the OTLP
``TraceService/Export`` RPC from ``opentelemetry-proto``, and ``GET /api/traces/<trace id>``
answering ``{"data": [{"traceID", "spans": [...], "processes": {...}}]}`` as Jaeger's query
service does (span ids in hex, times in microseconds, ``CHILD_OF`` references, tags).
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "bool_value", "int_value", "double_value") else str(v)


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    """OTLP ``MetricsService/Export``: each data point's latest value, by service, metric and attributes."""

    def __init__(self, backend: TraceBackend) -> None:
        self.backend = backend

    def Export(self, request: Any, context: Any) -> Any:
        with self.backend._lock:
            for rm in request.resource_metrics:
                resource = {a.key: _value(a.value) for a in rm.resource.attributes}
                service = str(resource.get("service.name", "?"))
                for sm in rm.scope_metrics:
                    for metric in sm.metrics:
                        kind = metric.WhichOneof("data")
                        for p in getattr(metric, kind).data_points:
                            attrs = {a.key: _value(a.value) for a in p.attributes}
                            if kind in ("histogram", "exponential_histogram"):
                                value: dict[str, Any] = {"count": p.count, "sum": p.sum}
                            else:
                                value = {"value": getattr(p, p.WhichOneof("value"))}
                            key = (service, metric.name, tuple(sorted(attrs.items())))
                            self.backend.points[key] = {"service": service, "name": metric.name, "kind": kind,
                                                        "attributes": attrs, "unit": metric.unit, **value}  # fmt: skip
        return metrics_service_pb2.ExportMetricsServiceResponse()


class TraceBackend(trace_service_pb2_grpc.TraceServiceServicer):
    """Spans by trace id (hex), as Jaeger would return them; metrics' latest data points."""

    def __init__(self) -> None:
        self.spans: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.points: dict[tuple[str, str, tuple[tuple[str, Any], ...]], dict[str, Any]] = {}
        """(service, metric, attributes) -> its latest data point (cumulative: the totals so far)."""
        self.exports = 0
        self._lock = threading.Lock()
        self._grpc: grpc.Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self.otlp_port = self.query_port = 0

    # --- OTLP in ------------------------------------------------------------------------------

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.exports += 1
            for rs in request.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                service = str(resource.get("service.name", "?"))
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        tags = [{"key": a.key, "value": _value(a.value)} for a in s.attributes]
                        tags.append({"key": "span.kind", "value": _KINDS.get(s.kind, "unspecified")})
                        if s.status.code == 2:
                            tags += [{"key": "otel.status_code", "value": "ERROR"}, {"key": "error", "value": True}]
                        trace_id = s.trace_id.hex()
                        self.spans[trace_id].append({
                            "traceID": trace_id, "spanID": s.span_id.hex(), "operationName": s.name,
                            "references": [{"refType": "CHILD_OF", "traceID": trace_id,
                                            "spanID": s.parent_span_id.hex()}] if s.parent_span_id else [],
                            "startTime": s.start_time_unix_nano // 1000,
                            "duration": max(0, (s.end_time_unix_nano - s.start_time_unix_nano) // 1000),
                            "tags": tags, "processID": service,
                        })  # fmt: skip
        return trace_service_pb2.ExportTraceServiceResponse()

    def metric(self, name: str) -> list[dict[str, Any]]:
        """The latest data points of one metric, every service and attribute set."""
        with self._lock:
            return [p for (_, n, _), p in self.points.items() if n == name]

    # --- Jaeger's query API out ---------------------------------------------------------------

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        with self._lock:
            spans = list(self.spans.get(trace_id, []))
        if not spans:
            return None
        processes = {s["processID"]: {"serviceName": s["processID"], "tags": []} for s in spans}
        return {"data": [{"traceID": trace_id, "spans": spans, "processes": processes}]}

    def start(self) -> TraceBackend:
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        # opentelemetry-proto's generated gRPC module has no annotations.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._grpc)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), self._grpc)  # type: ignore[no-untyped-call]
        self.otlp_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        backend = self

        class Query(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                prefix = "/api/traces/"
                found = backend.trace(self.path[len(prefix) :]) if self.path.startswith(prefix) else None
                body = json.dumps(found or {"data": None, "errors": [{"code": 404, "msg": "trace not found"}]}).encode()
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Query)
        self.query_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, daemon=True, name="jaeger-query").start()
        return self

    def stop(self) -> None:
        if self._grpc is not None:
            self._grpc.stop(grace=None)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    def __enter__(self) -> TraceBackend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def exporting(self) -> dict[str, str]:
        """The standard ``OTEL_*`` variables that point a service's exporters here, flushing
        spans every 0.2 s and metrics every 0.5 s (a test waits seconds, not a minute)."""
        return {"OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
                "OTEL_METRIC_EXPORT_INTERVAL": "500"}  # fmt: skip

    @property
    def otlp_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.otlp_port}"

    @property
    def query_url(self) -> str:
        return f"http://127.0.0.1:{self.query_port}"
