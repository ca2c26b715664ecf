"""One typed settings model per service: each reads the variables it always read, under their
historical names; a bad value stops the service with one line naming the variable; the READMEs'
settings tables are generated from the models and checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from mesh_agent.settings import AgentSettings
from mesh_budget.monitor import Rules
from mesh_budget.partition import Partition
from mesh_budget.settings import BudgetSettings, TenantLimits
from mesh_checker.settings import CheckerSettings
from mesh_host.runtime import load_settings
from mesh_kit import ServiceSettings
from mesh_planner.settings import PlannerSettings
from mesh_rag.settings import RagSettings
from mesh_testing.scripts import load_script
from mesh_tool_executor.net import AllowList
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_worker.settings import WorkerSettings

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


doc = load_script(ROOT / "infra" / "settings_doc.py")  # a development script, not a package module

AGENT = {
    "MESH_MODEL",
    "MESH_MODEL_CONFIG",
    "MESH_CONTEXT_STRATEGY",
    "MESH_LLM_CACHE",
    "MESH_LLM_CACHE_TTL_S",
    "MESH_PROMPTS_DIR",
    "MESH_PRICE_TABLE_FILE",
    "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT",
}
HISTORICAL = {
    # The variables each service read before it had a settings model (environment reads in its
    # code, the budget's own BaseSettings): deployments, manifests and tests set these names.
    PlannerSettings: AGENT
    | {
        "MESH_ADMISSION_MAX_IN_FLIGHT",
        "MESH_ADMISSION_RATE_PER_S",
        "MESH_ADMISSION_BURST",
        "MESH_RUN_SLOTS",
        "MESH_RUN_SLOTS_ALONE",
        "MESH_PLANNING_SLOTS",
        "MESH_PLAN_REVIEW",
        "MESH_PLAN_FIXED",
        "MESH_ADMISSION_TENANTS",
        "MESH_STORE_HIGH_WATER",
        "MESH_STORE_RETRY_AFTER_S",
    },
    CheckerSettings: AGENT,
    WorkerSettings: AGENT
    | {
        "MESH_WORKER_POOL",  # issue 48: a worker pool's deployment
        "MESH_TOOL_TIMEOUT_S",
        "MESH_TOOL_OUTPUT_MAX_CHARS",
        "MESH_LIVE_WINDOW_MS",
        "MESH_RETRIEVE_FIRST",
        "MESH_RETRIEVE_FIRST_TOP_K",
        "MESH_ANSWER_STYLE",
    },
    RagSettings: {
        "MESH_RAG_SEED_TENANTS",
        "MESH_TENANTS",
        "MESH_EMBED_MODEL_DIR",
        "MESH_EMBED_THREADS",
        "MESH_RAG_INDEX_MIB",
        "MESH_RAG_INDEX_DOCS",
        "MESH_RAG_INDEX_TENANTS",
    },
    ToolExecutorSettings: {
        "MESH_APPROVAL_TIMEOUT_S",
        "MESH_NOTES_PER_TENANT",
        "MESH_TOOL_POLICY",
        "MESH_MCP_CONFIG",
        "MESH_HTTP_ALLOW",
        "MESH_AUDIT_KEY_FILE",
        "MESH_TOOL_SECRETS_DIR",
        "MESH_TOOL_SERVER_CHECK_S",
        "MESH_TOOL_SERVERS_PER_TENANT",
    },
    BudgetSettings: {
        f"MESH_BUDGET_{name.upper()}"
        for name in (
            "reservation_ttl_s",
            "tenant_limits",
            "tenant_limits_file",
            "horizon_poll_s",
            "lookback_s",
            "tick_s",
            "task_memory_s",
            "audit_anchor_s",
            "metric_labels",
            "checkpoint_s",
            "watch_poll_s",
            "partitions",
            "partition",
            "loop_repeats",
            "chatter_window_s",
            "chatter_min_messages",
            "chatter_ratio",
            "retry_storm_errors",
            "retry_storm_window_s",
            "provider_window_s",
            "provider_min_calls",
            "provider_error_rate",
            "provider_cooldown_s",
            "iteration_cap",
        )
    },
}
SERVICE = {
    PlannerSettings: "planner",
    CheckerSettings: "checker",
    WorkerSettings: "worker",
    RagSettings: "rag",
    ToolExecutorSettings: "tool-executor",
    BudgetSettings: "budget",
}


@pytest.fixture
def env(monkeypatch, tmp_path):
    """An environment with only the identity files set (and whatever the test adds)."""
    for name in list(os.environ):
        if name.startswith("MESH_") or name.startswith("OTEL_INSTRUMENTATION_GENAI"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MESH_SIGNING_KEY_FILE", str(tmp_path / "signing.key"))
    monkeypatch.setenv("MESH_TRUST_BUNDLE_FILE", str(tmp_path / "bundle.json"))
    return monkeypatch


def own_variables(cls: type[ServiceSettings]) -> set[str]:
    return {n for f in cls.model_fields if f not in ServiceSettings.model_fields for n in cls.env_names(f)}


# --------------------------------------------------------------------------- the historical names


@pytest.mark.parametrize("cls", list(HISTORICAL), ids=lambda c: c.__name__)
def test_each_service_reads_exactly_its_historical_variables(cls):
    assert own_variables(cls) == HISTORICAL[cls]
    assert issubclass(cls, AgentSettings) == (cls in (PlannerSettings, WorkerSettings, CheckerSettings))


@pytest.mark.parametrize("cls", list(HISTORICAL), ids=lambda c: c.__name__)
def test_every_field_is_documented(cls):
    undocumented = [name for name, field in cls.model_fields.items() if not (field.description or "").strip()]
    assert undocumented == []


def test_admission_limits_per_tenant_are_checked(env):
    env.setenv("MESH_ADMISSION_TENANTS", '{"acme": {"max_in_flight": 3, "rate_per_s": 0}}')
    s = PlannerSettings(service="planner")
    assert s.admission_tenants == {"acme": {"max_in_flight": 3, "rate_per_s": 0}}
    env.setenv("MESH_ADMISSION_TENANTS", '{"acme": {"max_inflight": 3}}')
    with pytest.raises(ValidationError, match="unknown limit"):
        PlannerSettings(service="planner")


def test_tenant_quotas_name_the_streams_a_tenant_writes_to_and_known_limits(env):
    env.setenv("MESH_QUOTA_TENANTS", '{"acme": {"RAG": {"mib": 2048, "mib_per_min": 256}}}')
    assert RagSettings(service="rag").quota_tenants == {"acme": {"RAG": {"mib": 2048, "mib_per_min": 256}}}
    for bad, why in (
        ('{"acme": {"STEP": {"mib": 1}}}', "unknown stream 'STEP' (quotas apply to CONTROL, DLQ, RAG, TASK)"),
        ('{"acme": {"TASK": {"megs": 1}}}', "unknown limit(s) megs"),
        ('{"acme": {"TASK": {"mib": -1}}}', "limits must be >= 0"),
    ):
        env.setenv("MESH_QUOTA_TENANTS", bad)
        with pytest.raises(ValidationError) as exc:
            PlannerSettings(service="planner")
        assert why in PlannerSettings.error_line(exc.value)
    env.delenv("MESH_QUOTA_TENANTS")
    env.setenv("MESH_RAG_INDEX_TENANTS", '{"acme": {"mib": 1, "docs": 2}}')
    quota = RagSettings(service="rag").index_quota("acme")
    assert (quota.bytes, quota.docs) == (1 << 20, 2)
    env.setenv("MESH_RAG_INDEX_TENANTS", '{"acme": {"pages": 2}}')
    with pytest.raises(ValidationError, match="unknown limit"):
        RagSettings(service="rag")


def test_the_agent_services_read_their_model_settings(env, tmp_path):
    config, prices = tmp_path / "models.yaml", tmp_path / "prices.json"
    for name, value in {
        "MESH_MODEL": "  ",  # blank: scripted, as before
        "MESH_MODEL_CONFIG": str(config),
        "MESH_CONTEXT_STRATEGY": "drop_oldest",
        "MESH_LLM_CACHE": "off",
        "MESH_LLM_CACHE_TTL_S": "60",
        "MESH_PROMPTS_DIR": str(tmp_path),
        "MESH_PRICE_TABLE_FILE": str(prices),
        "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "True",
        "MESH_TOOL_TIMEOUT_S": "5",
        "MESH_TOOL_OUTPUT_MAX_CHARS": "100",
    }.items():
        env.setenv(name, value)
    for cls in (PlannerSettings, CheckerSettings, WorkerSettings):
        s = cls(service=SERVICE[cls])
        assert (s.model, s.model_config_file, s.context_strategy) == ("scripted", config, "drop_oldest")
        assert (s.llm_cache, s.llm_cache_ttl_s, s.prompts_dir, s.price_table_file) == (False, 60.0, tmp_path, prices)
        assert s.genai_capture_content is True
    w = WorkerSettings(service="worker")
    assert (w.tool_timeout_s, w.tool_output_max_chars) == (5.0, 100)

    env.setenv("MESH_MODEL_CONFIG", "")  # empty is unset, as before
    env.setenv("MESH_LLM_CACHE", "on")
    env.setenv("OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", "enabled")  # only true/1/yes turn it on
    s = PlannerSettings(service="planner")
    assert (s.model_config_file, s.llm_cache, s.genai_capture_content) == (None, True, False)


def test_the_rag_seeds_from_its_own_list_else_the_mesh_tenants(env, tmp_path):
    assert RagSettings(service="rag").seed_tenants == ["demo"]
    env.setenv("MESH_TENANTS", "acme,globex")
    assert RagSettings(service="rag").seed_tenants == ["acme", "globex"]
    env.setenv("MESH_RAG_SEED_TENANTS", "")  # set and empty: seed none (the scenarios do this)
    assert RagSettings(service="rag").seed_tenants == []
    env.setenv("MESH_RAG_SEED_TENANTS", "acme")
    env.setenv("MESH_EMBED_MODEL_DIR", str(tmp_path))
    env.setenv("MESH_EMBED_THREADS", "2")
    s = RagSettings(service="rag")
    assert (s.seed_tenants, s.embed_model_dir, s.embed_threads) == (["acme"], tmp_path, 2)


def test_the_tool_executor_reads_policy_inline_or_from_a_file_and_parses_its_values(env, tmp_path):
    key, mcp, policy = tmp_path / "audit.key", tmp_path / "mcp.json", tmp_path / "policy.json"
    key.write_text("ab" * 32 + "\n")
    policy.write_text('{"http_get": {"on_untrusted": "deny"}}')
    env.setenv("MESH_APPROVAL_TIMEOUT_S", "3")
    env.setenv("MESH_TOOL_POLICY", ' {"send_email": {"rate_per_min": 0}} ')
    env.setenv("MESH_MCP_CONFIG", str(mcp))
    env.setenv("MESH_HTTP_ALLOW", "localhost,10.0.0.0/8")
    env.setenv("MESH_AUDIT_KEY_FILE", str(key))
    s = ToolExecutorSettings(service="tool-executor")
    assert (s.approval_timeout_s, s.mcp_config, s.audit_key) == (3.0, mcp, bytes.fromhex("ab" * 32))
    assert s.policy == {"send_email": {"rate_per_min": 0}}
    assert s.allow == AllowList.parse("localhost,10.0.0.0/8")
    env.setenv("MESH_TOOL_POLICY", str(policy))
    env.setenv("MESH_AUDIT_KEY_FILE", " ")
    s = ToolExecutorSettings(service="tool-executor")
    assert s.policy == {"http_get": {"on_untrusted": "deny"}} and s.audit_key is None


def test_the_budget_reads_its_prefixed_variables_and_tenant_limits(env, tmp_path):
    env.setenv("MESH_BUDGET_RESERVATION_TTL_S", "5")
    env.setenv("MESH_BUDGET_LOOKBACK_S", "10")
    env.setenv("MESH_BUDGET_PROVIDER_COOLDOWN_S", "3")
    env.setenv("MESH_BUDGET_TENANT_LIMITS", '{"acme": {"daily_tokens": 1000}, "*": {"daily_cost_usd": 0.5}}')
    s = BudgetSettings(service="budget")
    assert (s.budget_reservation_ttl_s, s.budget_lookback_s) == (5.0, 10.0)
    assert s.rules() == Rules(provider_cooldown_s=3.0)
    assert s.limits() == {"acme": TenantLimits(daily_tokens=1000), "*": TenantLimits(daily_cost_usd=0.5)}
    limits = tmp_path / "limits.json"
    limits.write_text('{"globex": {"daily_tokens": 7}}')
    env.setenv("MESH_BUDGET_TENANT_LIMITS_FILE", str(limits))  # wins over the inline JSON
    assert BudgetSettings(service="budget").limits() == {"globex": TenantLimits(daily_tokens=7)}


def test_defaults_read_nothing_from_the_environment(env):
    env.setenv("MESH_TOOL_TIMEOUT_S", "5")
    env.setenv("MESH_BUDGET_TENANT_LIMITS", "not json")
    assert WorkerSettings.defaults().tool_timeout_s == 60.0
    assert BudgetSettings.defaults().limits() == {} and BudgetSettings.defaults().rules() == Rules()
    assert ToolExecutorSettings.defaults().policy == {} and ToolExecutorSettings.defaults().allow == AllowList()


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("cls", "name", "value", "line"),
    [
        (WorkerSettings, "MESH_MAX_WORKERS", "999", "MESH_MAX_WORKERS: Input should be less than or equal to 256"),
        (WorkerSettings, "MESH_TOOL_TIMEOUT_S", "0", "MESH_TOOL_TIMEOUT_S: Input should be greater than 0"),
        (WorkerSettings, "MESH_TOOL_OUTPUT_MAX_CHARS", "lots", "MESH_TOOL_OUTPUT_MAX_CHARS: Input should be a valid"),
        (PlannerSettings, "MESH_CONTEXT_STRATEGY", "truncate", "MESH_CONTEXT_STRATEGY: Input should be 'error', "),
        (CheckerSettings, "MESH_LLM_CACHE_TTL_S", "-1", "MESH_LLM_CACHE_TTL_S: Input should be greater than 0"),
        (RagSettings, "MESH_EMBED_THREADS", "0", "MESH_EMBED_THREADS: Input should be greater than or equal to 1"),
        (
            ToolExecutorSettings,
            "MESH_HTTP_ALLOW",
            "localhost,*.corp",
            "MESH_HTTP_ALLOW: '*.corp' is neither a host name nor an IP/CIDR",
        ),
        (ToolExecutorSettings, "MESH_TOOL_POLICY", '{"send_email": ', "MESH_TOOL_POLICY: Expecting "),
        (ToolExecutorSettings, "MESH_TOOL_POLICY", "/nonexistent/policy.json", "MESH_TOOL_POLICY: cannot read "),
        (ToolExecutorSettings, "MESH_AUDIT_KEY_FILE", "/nonexistent/audit.key", "MESH_AUDIT_KEY_FILE: cannot read "),
        (ToolExecutorSettings, "MESH_APPROVAL_TIMEOUT_S", "soon", "MESH_APPROVAL_TIMEOUT_S: Input should be a valid"),
        (BudgetSettings, "MESH_BUDGET_TENANT_LIMITS", "{", "MESH_BUDGET_TENANT_LIMITS: Expecting property name"),
        (BudgetSettings, "MESH_BUDGET_TENANT_LIMITS", "[1]", "MESH_BUDGET_TENANT_LIMITS: 'list' object has no"),
        (
            BudgetSettings,
            "MESH_BUDGET_TENANT_LIMITS",
            '{"acme": {"daily_tokens": 0}}',
            "MESH_BUDGET_TENANT_LIMITS: acme: daily_tokens: Input should be greater than 0",
        ),
        (BudgetSettings, "MESH_BUDGET_LOOP_REPEATS", "1", "MESH_BUDGET_LOOP_REPEATS: Input should be greater than or"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(env, capsys, cls, name, value, line):
    env.setenv(name, value)
    with pytest.raises(SystemExit) as exit_:
        load_settings(cls, SERVICE[cls])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"configuration error: {line}"), err
    assert err.count("\n") == 1, err


def test_a_budget_partition_out_of_range_is_one_line(env, capsys):
    env.setenv("MESH_BUDGET_PARTITIONS", "2")
    env.setenv("MESH_BUDGET_PARTITION", "5")
    with pytest.raises(SystemExit):
        load_settings(BudgetSettings, "budget")
    err = capsys.readouterr().err
    assert "MESH_BUDGET_PARTITION must be 0 to 1 with 2 partitions, not 5" in err and err.count("\n") == 1, err
    env.setenv("MESH_BUDGET_PARTITION", "1")
    assert load_settings(BudgetSettings, "budget").partition() == Partition(1, 2)


def test_a_policy_that_is_not_an_object_keeps_its_message(env, tmp_path, capsys):
    (tmp_path / "policy.json").write_text("[1, 2]")
    env.setenv("MESH_TOOL_POLICY", str(tmp_path / "policy.json"))
    with pytest.raises(SystemExit):
        load_settings(ToolExecutorSettings, "tool-executor")
    assert capsys.readouterr().err == (
        "configuration error: MESH_TOOL_POLICY must be a JSON object of tool name -> policy overrides\n"
    )


def test_a_service_process_stops_at_start_up_with_the_line(env):
    env.setenv("MESH_BUDGET_RESERVATION_TTL_S", "0")
    done = subprocess.run([sys.executable, "-m", "mesh_budget"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "configuration error: MESH_BUDGET_RESERVATION_TTL_S: Input should be greater than 0\n"


def test_the_model_settings_reach_the_models(env, tmp_path):
    from mesh_agent.metered import configured

    mesh = SimpleNamespace(settings=SimpleNamespace(redis_url=""), service="worker")
    table = tmp_path / "prices.json"
    table.write_text(
        json.dumps({"version": "t-1", "prices": {"scripted/*": {"input_per_mtok": 1, "output_per_mtok": 2}}})
    )
    env.setenv("MESH_PRICE_TABLE_FILE", str(table))
    env.setenv("MESH_CONTEXT_STRATEGY", "summarise")
    models = configured(mesh, WorkerSettings(service="worker"))  # type: ignore[arg-type]
    assert (models.price_table.version, models.context_strategy, models.cache) == ("t-1", "summarise", None)
    (tmp_path / "broken.json").write_text("{}")
    broken = WorkerSettings(service="worker", price_table_file=tmp_path / "broken.json")
    with pytest.raises(SystemExit, match=r"^configuration error: MESH_PRICE_TABLE_FILE: price table: expected"):
        configured(mesh, broken)  # type: ignore[arg-type]
    env.setenv("MESH_MODEL", "gpt-4o")
    with pytest.raises(SystemExit, match=r"^configuration error: MESH_MODEL='gpt-4o' needs a model config"):
        configured(mesh, WorkerSettings(service="worker"))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the README tables


def _copy_readmes(dest: Path) -> None:
    for rel in doc.TARGETS:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, dest / rel)


def test_the_readme_tables_are_up_to_date():
    assert doc.check(ROOT) == [], "run `make settings-docs`"


def test_a_stale_table_fails_the_check_with_a_diff_and_write_fixes_it(tmp_path, capsys):
    _copy_readmes(tmp_path)
    assert doc.main(["check", "--root", str(tmp_path)]) == 0
    readme = tmp_path / "services/worker/README.md"
    text = readme.read_text()
    readme.write_text(
        text.replace("| `MESH_TOOL_TIMEOUT_S` | float, > 0 | `60` |", "| `MESH_TOOL_TIMEOUT_S` | float | `30` |")
    )
    capsys.readouterr()
    assert doc.main(["check", "--root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert f"--- {readme}" in out and "-| `MESH_TOOL_TIMEOUT_S` | float | `30` |" in out
    assert "+| `MESH_TOOL_TIMEOUT_S` | float, > 0 | `60` |" in out
    assert "1 settings table(s) out of date" in err
    assert doc.write(tmp_path) == [readme] and readme.read_text() == text
    assert doc.check(tmp_path) == []


def test_a_readme_without_markers_is_an_error(tmp_path, capsys):
    _copy_readmes(tmp_path)
    readme = tmp_path / "services/rag/README.md"
    readme.write_text(readme.read_text().replace(doc.BEGIN, ""))
    assert doc.main(["check", "--root", str(tmp_path)]) == 1
    assert "services/rag/README.md: no <!-- settings:begin -->" in capsys.readouterr().err


def test_a_warm_standby_waits_for_its_order_and_ends_quietly_without_one(monkeypatch):
    """``--standby`` (``meshctl up --standby``): the process holds until one line tells it what it
    becomes (its environment); the end of its input (its supervisor gone) ends it, exit 0."""
    import io

    from mesh_host.runtime import await_activation

    monkeypatch.setenv("MESH_HEALTH_PORT", "0")  # restored afterwards, whatever await_activation sets
    monkeypatch.delenv("MESH_HEALTH_PORT")
    with pytest.raises(SystemExit) as gone:
        await_activation(io.StringIO(""))
    assert gone.value.code == 0 and "MESH_HEALTH_PORT" not in os.environ
    await_activation(io.StringIO('{"env": {"MESH_HEALTH_PORT": 18081}}\n{"env": {"MESH_HEALTH_PORT": 1}}\n'))
    assert os.environ["MESH_HEALTH_PORT"] == "18081", "the first line only, as a string"
