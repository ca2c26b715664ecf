"""With MESH_TEST_INFRA=images the mesh the end-to-end tests talk to is the six service images
(`make images`), run as Kubernetes runs them: these tests check that it is, and that each
container is as locked down as infra/k8s/base says."""

from __future__ import annotations

import json
import os

import pytest

from mesh_testing.infra import infra_mode
from meshctl.local import SERVICES

pytestmark = pytest.mark.skipif(
    infra_mode() != "images",
    reason="the services run from their images only with MESH_TEST_INFRA=images (make test-images)",
)


def containers(mesh) -> dict:
    out = {}
    for name, svc in mesh.services.items():
        c = svc.get_wrapped_container()
        c.reload()
        out[name] = c
    return out


def test_every_service_is_a_container_of_its_own_image(e2e_mesh):
    from mesh_testing.service_images import image_of

    running = containers(e2e_mesh)
    assert sorted(running) == sorted(SERVICES)
    for name, c in running.items():
        assert c.status == "running", name
        assert image_of(name) in c.image.tags, (name, c.image.tags)
        # the image's own entry point, not a command of the test's
        assert c.attrs["Config"]["Entrypoint"] or c.attrs["Config"]["Cmd"], name


def test_each_container_is_locked_down_as_the_deployment_runs_it(e2e_mesh):
    for name, c in containers(e2e_mesh).items():
        host = c.attrs["HostConfig"]
        assert host["ReadonlyRootfs"] is True, name
        assert host["CapDrop"] == ["ALL"], name
        assert "no-new-privileges" in host["SecurityOpt"], name
        if os.geteuid() == 0:  # a non-root runner runs them as itself
            assert c.attrs["Config"]["User"] == "10001:10001", name
            uids = {row[1] for row in c.top(ps_args="-o pid,uid")["Processes"]}
            assert uids == {"10001"}, (name, uids)
        mounts = {m["Destination"]: m for m in c.attrs["Mounts"]}
        assert set(mounts) == {"/var/run/secrets/agentmesh", "/etc/agentmesh"}, (name, sorted(mounts))
        assert not any(m["RW"] for m in mounts.values()), name


def test_a_container_holds_its_own_identity_and_nothing_of_another(e2e_mesh):
    for name, c in containers(e2e_mesh).items():
        listing = c.exec_run(
            ["python", "-c", "import json, os; print(json.dumps(os.listdir('/var/run/secrets/agentmesh')))"]
        )
        assert listing.exit_code == 0, listing.output
        files = json.loads(listing.output)
        expected = {"nats.creds", "signing-key.pem", "data.key"}  # the deployment's data key: every service's
        if name in ("budget", "rag", "tool-executor"):
            expected.add("redis-url")
        if name == "tool-executor":
            expected.add("audit.key")
        assert set(files) == expected, (name, files)
        # the creds are this service's user: its name is in the JWT the file holds
        creds = c.exec_run(["python", "-c", "print(open('/var/run/secrets/agentmesh/nats.creds').read())"])
        assert creds.exit_code == 0
        assert b"-----BEGIN NATS USER JWT-----" in creds.output


def test_the_root_filesystem_cannot_be_written(e2e_mesh):
    for name, c in containers(e2e_mesh).items():
        wrote = c.exec_run(["python", "-c", "open('/opt/venv/tampered', 'w')"])
        assert wrote.exit_code != 0 and b"Read-only file system" in wrote.output, name
        scratch = c.exec_run(["python", "-c", "open('/tmp/scratch', 'w').write('ok')"])
        assert scratch.exit_code == 0, name  # /tmp is a tmpfs, as emptyDir in k8s
