"""The six services as containers of their own images, for ``MESH_TEST_INFRA=images``.

The images are the ones ``make images`` builds (``agentmesh/<service>:local``; another tag with
``MESH_TEST_IMAGE_TAG``). Each container runs as Kubernetes runs it (infra/k8s/base): the image's
own unprivileged user (10001), a read-only root filesystem, every capability dropped,
no-new-privileges, and only its own identity mounted, at the same paths as the Deployment's
volumes:

    /var/run/secrets/agentmesh/   nats.creds, signing-key.pem, redis-url, audit.key, data.key (0400, uid 10001)
    /etc/agentmesh/               trust-bundle.json, tls/ca.crt

Networking is the host's (the engine runs with ``--bridge=none``, DESIGN.md section 9), so each
service's health server binds 127.0.0.1 on a port of its own, and NATS and Redis are reached on
loopback as the processes reach them. Provisioning runs the meshctl image the way the k8s Job
does (``meshctl provision``, the admin credentials mounted at /mesh/secrets/creds).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from pathlib import Path

import docker.errors
import httpx

from mesh_contracts import SERVICES
from mesh_testing.containers import _engine, _ServerContainer
from meshctl import local
from meshctl.identity import Identities

IMAGE_TAG_ENV = "MESH_TEST_IMAGE_TAG"
IMAGE_USER = 10001  # the user infra/images/*/Dockerfile create
SECRETS_IN = "/var/run/secrets/agentmesh"
CONFIG_IN = "/etc/agentmesh"
# Environment that describes this machine or this process, not the service: never passed in.
_KEEP_PREFIXES = ("MESH_", "OTEL_")


def image_of(name: str) -> str:
    return f"agentmesh/{name}:{os.environ.get(IMAGE_TAG_ENV, 'local')}"


def require_images(names: list[str]) -> None:
    """Fail with the command that fixes it when an image is missing (never build here: a test
    run must not take minutes to find out it has nothing to test)."""
    client = _engine(timeout=30)
    try:
        missing = []
        for name in names:
            try:
                client.images.get(image_of(name))
            except docker.errors.ImageNotFound:
                missing.append(image_of(name))
        if missing:
            raise RuntimeError(f"MESH_TEST_INFRA=images needs {', '.join(missing)}: run `make images` first")
    finally:
        client.close()


def _owned_by_image_user(path: Path, mode: int) -> None:
    path.chmod(mode)
    if os.geteuid() == 0:
        os.chown(path, IMAGE_USER, IMAGE_USER)


def stage_identity(ids: Identities, service: str) -> tuple[Path, Path]:
    """Copy ``service``'s files (and nothing of any other principal's) into two folders laid out
    as the Secret and ConfigMap volumes are; owned by the image's user, as fsGroup makes them."""
    root = ids.home / "images" / service
    secrets, config = root / "secrets", root / "config"
    shutil.rmtree(root, ignore_errors=True)
    (config / "tls").mkdir(parents=True)
    secrets.mkdir(parents=True)
    files = {
        secrets / "nats.creds": ids.creds(service),
        secrets / "signing-key.pem": ids.signing_key(service),
        secrets / "redis-url": ids.secrets / "redis" / f"{service}.url",
        config / "trust-bundle.json": ids.trust_bundle,
        config / "tls" / "ca.crt": ids.tls_ca,
        secrets / "data.key": ids.data_key,  # the deployment's data key, every service's
    }
    if service == "tool-executor":
        files[secrets / "audit.key"] = ids.audit_key
    for dest, src in files.items():
        if src.exists():
            shutil.copyfile(src, dest)
            _owned_by_image_user(dest, 0o400 if dest.parent == secrets else 0o444)
    for folder in (config / "tls", config, secrets):
        _owned_by_image_user(folder, 0o555 if folder != secrets else 0o500)
    return secrets, config


def container_env(
    ids: Identities, service: str, nats_url: str, health_port: int, extra: dict[str, str]
) -> dict[str, str]:
    """What :func:`meshctl.local.service_env` gives a process, with the paths the container sees."""
    env = local.service_env(ids, service, nats_url, health_port, extra)
    env = {k: v for k, v in env.items() if k.startswith(_KEEP_PREFIXES)}
    env.update(
        {
            "MESH_CREDS_FILE": f"{SECRETS_IN}/nats.creds",
            "MESH_SIGNING_KEY_FILE": f"{SECRETS_IN}/signing-key.pem",
            "MESH_TRUST_BUNDLE_FILE": f"{CONFIG_IN}/trust-bundle.json",
            "MESH_HEALTH_HOST": "127.0.0.1",  # host networking: loopback only
        }
    )
    for key, path in (
        ("MESH_REDIS_URL_FILE", "redis-url"),
        ("MESH_AUDIT_KEY_FILE", "audit.key"),
        ("MESH_DATA_KEY_FILE", "data.key"),
    ):
        if key in env:
            env[key] = f"{SECRETS_IN}/{path}"
    if "MESH_TLS_CA_FILE" in env:
        env["MESH_TLS_CA_FILE"] = f"{CONFIG_IN}/tls/ca.crt"
    return env


class ServiceContainer(_ServerContainer):
    """One service from its image, locked down as the Deployment runs it. What a test reads of it
    is what it reads of a process: ``http_port`` (its health server) and its log."""

    stop_timeout = 20  # the service drains on SIGTERM (graceful_timeout_s) before it is killed

    def __init__(self, ids: Identities, service: str, nats_url: str, extra_env: dict[str, str]) -> None:
        self.service = service
        self.http_port = local.free_port()
        user = f"{IMAGE_USER}:{IMAGE_USER}" if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}"
        super().__init__(
            image_of(service),
            command=[],  # the image's own entry point
            port=self.http_port,
            ready_log=None,
            startup_timeout=60,
            name_prefix=f"agentmesh-{service}",
            user=user,
        )
        secrets, config = stage_identity(ids, service)
        self.with_volume_mapping(str(secrets), SECRETS_IN, "ro")
        self.with_volume_mapping(str(config), CONFIG_IN, "ro")
        self.tmpfs["/tmp"] = "mode=1777,size=64m"
        for key, value in container_env(ids, service, nats_url, self.http_port, extra_env).items():
            self.with_env(key, value)

    def log_text(self) -> str:
        out, err = self.get_logs()
        return (out + err).decode(errors="replace")


def start_service_containers(
    ids: Identities, nats_url: str, services: tuple[str, ...] = SERVICES, extra_env: dict[str, str] | None = None
) -> dict[str, ServiceContainer]:
    require_images(list(services))
    started: dict[str, ServiceContainer] = {}
    try:
        for service in services:
            container = ServiceContainer(ids, service, nats_url, extra_env or {})
            container.start()
            started[service] = container
    except BaseException:
        stop_service_containers(ids, started)
        raise
    return started


async def wait_ready(services: dict[str, ServiceContainer], timeout: float = 60.0) -> None:
    """Until every service's /readyz answers 200; a container that exits fails at once, with
    the end of its log."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1.0) as http:
        for name, svc in services.items():
            while True:
                svc.get_wrapped_container().reload()
                if svc.get_wrapped_container().status == "exited":
                    tail = svc.log_text().strip().splitlines()[-8:]
                    raise RuntimeError(f"{name} (image {image_of(name)}) exited during start-up:\n" + "\n".join(tail))
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{svc.http_port}/readyz")).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    tail = svc.log_text().strip().splitlines()[-8:]
                    raise RuntimeError(f"{name} not ready after {timeout:.0f}s:\n" + "\n".join(tail))
                await asyncio.sleep(0.1)


def stop_service_containers(ids: Identities, services: dict[str, ServiceContainer]) -> None:
    """Stop every container (SIGTERM, then SIGKILL), keeping each one's log under the home's logs/."""
    logs = ids.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for name, svc in services.items():
        with contextlib.suppress(Exception):
            (logs / f"{name}.log").write_text(svc.log_text())
        svc.stop()


def provision_with_image(ids: Identities, nats_url: str, replicas: int = 1) -> str:
    """``meshctl provision`` from the meshctl image, as the k8s provisioning Job runs it; its
    output. Raises with that output when it fails."""
    require_images(["meshctl"])
    staging = ids.home / "images" / "meshctl"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "creds").mkdir(parents=True)
    (staging / "tls").mkdir()
    shutil.copyfile(ids.creds("admin"), staging / "creds" / "admin.creds")
    _owned_by_image_user(staging / "creds" / "admin.creds", 0o400)
    env = {}
    if ids.tls_ca.exists():
        shutil.copyfile(ids.tls_ca, staging / "tls" / "ca.crt")
        _owned_by_image_user(staging / "tls" / "ca.crt", 0o444)
        env["MESH_TLS_CA_FILE"] = "/etc/agentmesh/tls/ca.crt"
    for folder in (staging / "creds", staging / "tls"):
        _owned_by_image_user(folder, 0o555)
    client = _engine(timeout=120)
    try:
        container = client.containers.run(
            image_of("meshctl"),
            ["provision", "--nats-url", nats_url, "--replicas", str(replicas)],
            detach=True,
            network_mode="host",
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            user=f"{IMAGE_USER}:{IMAGE_USER}" if os.geteuid() == 0 else f"{os.getuid()}:{os.getgid()}",
            environment=env,
            volumes={
                str(staging / "creds"): {"bind": "/mesh/secrets/creds", "mode": "ro"},
                str(staging / "tls"): {"bind": "/etc/agentmesh/tls", "mode": "ro"},
            },
            labels={"org.agentmesh.test": "true"},
        )
        try:
            status = container.wait(timeout=120)
            output: str = container.logs().decode(errors="replace")
        finally:
            container.remove(force=True)
    finally:
        client.close()
    if status.get("StatusCode") != 0:
        raise RuntimeError(f"meshctl provision (image) exited {status.get('StatusCode')}:\n{output}")
    return output
