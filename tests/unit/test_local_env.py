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


def test_free_ports_handed_out_are_distinct_even_when_the_kernel_repeats_one(monkeypatch):
    """A mesh once got the same port for NATS and Redis: the kernel offered it again as soon as
    the probe socket closed. ``free_port`` never hands out a port it handed out lately."""
    import socket as socket_mod

    from meshctl import local

    offers = iter([40001, 40001, 40001, 40002])

    class Probe:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, addr):
            self.port = next(offers)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(socket_mod, "socket", Probe)
    local._HANDED.clear()
    assert [local.free_port(), local.free_port()] == [40001, 40002]


def test_the_local_mesh_provisions_the_ack_wait_its_services_keep_alive_by(monkeypatch):
    """``MESH_ACK_WAIT_S`` reaches both sides: the services keep messages alive every quarter of it,
    and ``local.up`` provisions the consumers with it (they must match); a bad value is refused
    before anything starts."""
    from mesh_contracts import topology as topo
    from meshctl.local import MeshError, ack_wait_s

    monkeypatch.delenv("MESH_ACK_WAIT_S", raising=False)
    assert ack_wait_s() == topo.ACK_WAIT_S
    monkeypatch.setenv("MESH_ACK_WAIT_S", "7.5")
    assert ack_wait_s() == 7.5
    for bad in ("0", "-1", "two", "nan"):
        monkeypatch.setenv("MESH_ACK_WAIT_S", bad)
        with pytest.raises(MeshError, match="MESH_ACK_WAIT_S"):
            ack_wait_s()
