"""Every service holds its tenants to their share (``mesh_tenancy``), and the bus will not run a
service that keeps doors without it: the quota hole of issue 36 cannot reopen by a forgotten line."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from mesh_contracts import SERVICES
from mesh_contracts import topology as topo
from mesh_contracts.v1 import TaskSubmitted
from mesh_host import Mesh
from mesh_host.errors import HostError
from mesh_kit import ServiceSettings
from mesh_tenancy import Tenancy, tenancy

pytestmark = pytest.mark.unit

MODULES = {s: f"mesh_{s.replace('-', '_')}" for s in SERVICES}


def _mesh(keys, service: str) -> Mesh:
    settings = ServiceSettings(service=service, signing_key_file=Path("unused"), trust_bundle_file=Path("unused"))
    return Mesh(settings, signer=keys.signer(service), verifier=keys.verifier())


@pytest.mark.parametrize("service", SERVICES)
async def test_every_service_installs_its_tenancy_and_keeps_the_doors_of_what_tenants_write(keys, service):
    module = importlib.import_module(f"{MODULES[service]}.service")
    settings_module = importlib.import_module(f"{MODULES[service]}.settings")
    settings_class = next(
        v for k, v in vars(settings_module).items()
        if isinstance(v, type) and issubclass(v, ServiceSettings) and v is not ServiceSettings and k.endswith("Settings")
        and v.__module__ == settings_module.__name__  # the service's own, not one it imports (AgentSettings)
    )  # fmt: skip
    settings = settings_class(
        service=service, signing_key_file=Path("unused"), trust_bundle_file=Path("unused"),
        redis_url="redis://127.0.0.1:1/0",  # the budget refuses to build without one; nothing connects here
    )  # fmt: skip
    mesh = Mesh(settings, signer=keys.signer(service), verifier=keys.verifier())
    await module.build(mesh, settings)  # registers; no I/O until start
    assert isinstance(mesh.tenancy, Tenancy), f"{service}: build() must call mesh_tenancy.install(mesh)"
    want = {d.pattern for d in topo.doors() if d.service == service}
    assert {d.pattern for d in mesh.doors} == want, f"{service} keeps the doors of the contracts tenants write to it"


async def test_a_service_with_doors_and_no_tenancy_refuses_to_start_before_connecting(keys):
    mesh = _mesh(keys, "planner")

    async def handler(m: TaskSubmitted, d: object) -> None: ...

    mesh.consume(TaskSubmitted, handler)  # type: ignore[arg-type]
    with pytest.raises(HostError, match="planner keeps doors \\(TASK\\) but has no tenancy"):
        await mesh.start()  # no server runs here: it must fail before it tries to connect
    assert tenancy.install(mesh) is tenancy.install(mesh), "installing twice gives the same tenancy"
