"""The alert rules and the Grafana dashboard under infra/observability: well formed, and every
metric they read is one that is emitted, under the name Prometheus sees.

Mesh metrics reach Prometheus through the OpenTelemetry collector's prometheus exporter, which
turns ``mesh.budget.trips`` (a counter) into ``mesh_budget_trips_total`` and a histogram in
seconds into ``<name>_seconds_bucket|_count|_sum``. ``EMITTED`` maps each Prometheus name the
assets use to the OTel instrument in ``mesh_kit.telemetry`` (so renaming a metric there fails
here) with the kind and unit it is created with. Stream and consumer metrics come from NATS'
prometheus-nats-exporter (``-jsz=all``). No promtool here: expressions are checked for the
names and labels they use, not parsed in full.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from mesh_agent import genai
from mesh_budget import metrics as budget_metrics
from mesh_checker import metrics as checker_metrics
from mesh_kit import telemetry as tel

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2] / "infra" / "observability"


def prometheus_names(otel: str, kind: str, unit: str) -> set[str]:
    """What the collector's prometheus exporter calls an OTel instrument (add_metric_suffixes)."""
    base = otel.replace(".", "_")
    suffix = {"s": "seconds", "USD": "USD", "By": "bytes"}.get(unit, "")
    if suffix and not base.endswith(f"_{suffix}"):
        base = f"{base}_{suffix}"
    if kind == "counter":
        return {f"{base}_total"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_count", f"{base}_sum"}
    return {base}


EMITTED = {
    # OTel name, kind, unit (as created: mesh_budget/service.py, mesh_kit Mesh.count, metered calls)
    (budget_metrics.M_BUDGET_TRIPS, "counter", "{trip}"): {"tenant", "kind", "action"},
    (budget_metrics.M_BUDGET_COST, "counter", "USD"): {
        "tenant",
        "agent",
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "mesh_label_team",
    },
    (budget_metrics.M_BUDGET_TOKENS, "counter", "{token}"): {
        "tenant",
        "agent",
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "token_type",
        "mesh_label_team",
    },
    (tel.M_HANDLED, "counter", "{event}"): {"service"},
    (tel.M_REDELIVERED, "counter", "{event}"): {"service"},
    (checker_metrics.M_CHECK_VERDICTS, "counter", "{verdict}"): {
        "outcome",
        "tenant",
        "gen_ai_agent_name",
        "mesh_prompt_version",
    },
    (genai.M_GEN_AI_DURATION, "histogram", "s"): {
        "gen_ai_operation_name",
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "gen_ai_response_model",
        "error_type",
        "le",
    },
    (genai.M_GEN_AI_TOKEN_USAGE, "histogram", "{token}"): {
        "gen_ai_operation_name",
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "gen_ai_response_model",
        "gen_ai_token_type",
        "le",
    },
}
NATS_EXPORTER = {
    "jetstream_stream_total_messages": {"stream_name"},
    "jetstream_consumer_num_pending": {"stream_name", "consumer_name"},
}
KNOWN: dict[str, set[str]] = dict(NATS_EXPORTER)
for (otel, kind, unit), labels in EMITTED.items():
    for name in prometheus_names(otel, kind, unit):
        KNOWN[name] = labels

FUNCTIONS = {"sum", "rate", "increase", "histogram_quantile", "by", "without", "on", "ignoring", "avg", "max", "min",
             "count", "le"}  # fmt: skip


def metrics_and_labels(expr: str) -> tuple[set[str], set[str]]:
    """The metric names an expression reads, and the labels it names (in by(...) and {...})."""
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    labels = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", no_strings):
        labels |= {x.strip() for x in group.split(",") if x.strip()}
    for matcher in re.findall(r"\{([^}]*)\}", no_strings):
        labels |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!=|!~|=)", matcher))
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)", " ", no_strings)
    names = {w for w in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", bare) if w not in FUNCTIONS}
    return names, labels


def _check(expr: str, where: str) -> None:
    names, labels = metrics_and_labels(expr)
    assert names, f"{where}: reads no metric"
    for name in names:
        assert name in KNOWN, f"{where}: {name} is not a metric the mesh or the NATS exporter emits"
    allowed = set().union(*(KNOWN[n] for n in names))
    assert labels <= allowed, f"{where}: labels {sorted(labels - allowed)} are not on {sorted(names)}"


def test_the_alert_rules_are_well_formed_and_read_only_emitted_metrics():
    doc = yaml.safe_load((ROOT / "alerts.yaml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert {g["name"] for g in doc["groups"]} == {"agentmesh"} and len(rules) >= 5
    alerts = {r["alert"] for r in rules}
    assert len(alerts) == len(rules), "alert names are unique"
    assert {"AgentMeshBudgetTrip", "AgentMeshDeadLettersGrowing", "AgentMeshConsumerLag",
            "AgentMeshProviderBreakerOpen"} <= alerts  # fmt: skip
    for r in rules:
        assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]
        assert r["expr"].count("(") == r["expr"].count(")"), r["alert"]
        _check(r["expr"], r["alert"])


def test_the_grafana_dashboard_is_well_formed_and_reads_only_emitted_metrics():
    dash = json.loads((ROOT / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    panels = dash["panels"]
    assert len(panels) >= 8 and len({p["id"] for p in panels}) == len(panels)
    for p in panels:
        assert p["type"] == "timeseries" and p["datasource"]["type"] == "prometheus"
        assert p["targets"] and all(t["refId"] and t["expr"] for t in p["targets"])
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), p["title"]
            _check(t["expr"], p["title"])


def test_the_check_catches_an_unknown_metric_and_an_unknown_label():
    with pytest.raises(AssertionError, match="not a metric"):
        _check("sum(rate(mesh_budget_trip_total[5m]))", "typo")
    with pytest.raises(AssertionError, match="labels"):
        _check("sum by (model) (rate(mesh_budget_trips_total[5m]))", "wrong label")
    assert prometheus_names("gen_ai.client.operation.duration", "histogram", "s") >= {
        "gen_ai_client_operation_duration_seconds_count"
    }
