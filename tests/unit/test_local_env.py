"""`meshctl up` hands every service setting in its environment to the services it starts, and
sets identity, connections and ports itself (never the operator's)."""

from __future__ import annotations

import pytest

from mesh_budget.settings import BudgetSettings
from mesh_checker.settings import CheckerSettings
from mesh_planner.settings import PlannerSettings
from mesh_rag.settings import RagSettings
from mesh_tool_executor.settings import ToolExecutorSettings
from mesh_worker.settings import WorkerSettings
from meshctl import local
from meshctl.identity import Identities

CLASSES = {
    "planner": PlannerSettings,
    "worker": WorkerSettings,
    "checker": CheckerSettings,
    "rag": RagSettings,
    "tool-executor": ToolExecutorSettings,
    "budget": BudgetSettings,
}


@pytest.mark.parametrize("service", sorted(CLASSES))
def test_every_setting_of_a_service_reaches_it_from_the_operators_environment(monkeypatch, tmp_path, service):
    cls = CLASSES[service]
    names = {n for f in cls.model_fields for n in cls.env_names(f) if n.startswith("MESH_")}
    for n in names:
        monkeypatch.setenv(n, f"operator:{n}")
    for n in ("MESH_HOME", "MESH_FAULTS", "MESH_TEST_INFRA", "MESH_CHAOS_REPORT"):
        monkeypatch.setenv(n, "operator")
    env = local.service_env(Identities(tmp_path), service, "nats://127.0.0.1:1", 9999, {})
    for n in sorted(names - local.SET_PER_SERVICE):
        assert env.get(n) == f"operator:{n}", f"{n} does not reach {service}"
    for n in local.SET_PER_SERVICE & set(env):
        assert not env[n].startswith("operator"), f"{n} is meshctl's to set, not the operator's"
    assert env["MESH_NATS_URL"] == "nats://127.0.0.1:1" and env["MESH_HEALTH_PORT"] == "9999"
    for n in ("MESH_HOME", "MESH_FAULTS", "MESH_TEST_INFRA", "MESH_CHAOS_REPORT"):
        assert n not in env, f"{n} is not a service setting"
