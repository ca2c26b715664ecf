"""pytest plugin (entry point ``pytest11``): session-scoped real infrastructure.

``integration_infra`` serves tests that act as services themselves; ``e2e_mesh`` runs the
six real services against infrastructure of its own, so the two never compete for the
same durable consumers.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh_testing.infra import Infra, RunningMesh, running_infra, running_mesh

TENANTS = ["acme", "globex"]


@pytest.fixture(scope="session")
def integration_infra() -> Iterator[Infra]:
    with running_infra(TENANTS, name="integration") as infra:
        yield infra


@pytest.fixture(scope="session")
def e2e_infra() -> Iterator[Infra]:
    with running_infra(TENANTS, name="e2e") as infra:
        yield infra


@pytest.fixture(scope="session")
def e2e_mesh(e2e_infra: Infra) -> Iterator[RunningMesh]:
    with running_mesh(e2e_infra) as mesh:
        yield mesh
