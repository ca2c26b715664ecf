"""Smoke tests for mesh_testing.containers: locally built images, NATS JetStream and Redis in
containers on loopback, and no container left behind.

Needs a reachable Docker engine (`.ci/docker-up.sh` starts one); skipped otherwise, and when
USE_TESTCONTAINERS=0 asks for the local-binary path instead.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

pytest.importorskip("testcontainers", reason="testcontainers is not installed")

import docker
import docker.errors

from mesh_testing.containers import (
    NATS_IMAGE,
    REDIS_IMAGE,
    RedisServerContainer,
    build_nats_image,
    build_redis_image,
    docker_available,
    nats_container,
    redis_container,
)

pytestmark = [
    pytest.mark.docker,
    pytest.mark.skipif(
        not docker_available(),
        reason="no Docker engine reachable (or USE_TESTCONTAINERS=0); run .ci/docker-up.sh",
    ),
]


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def engine() -> Iterator[docker.DockerClient]:
    client = docker.from_env(timeout=30)
    yield client
    client.close()


def _containers_named(engine: docker.DockerClient, prefix: str) -> list[str]:
    """Ids of all containers (any state) whose name starts with ``prefix``."""
    found = engine.containers.list(all=True, filters={"name": f"^/?{prefix}"})
    return [c.id for c in found]


def test_images_build_and_are_cached(engine: docker.DockerClient) -> None:
    assert build_nats_image() == NATS_IMAGE
    assert build_redis_image() == REDIS_IMAGE
    nats_id = engine.images.get(NATS_IMAGE).id
    redis_id = engine.images.get(REDIS_IMAGE).id
    # Same binaries -> the label check must reuse the images, not rebuild them.
    build_nats_image()
    build_redis_image()
    assert engine.images.get(NATS_IMAGE).id == nats_id
    assert engine.images.get(REDIS_IMAGE).id == redis_id
    for tag in (NATS_IMAGE, REDIS_IMAGE):
        labels = engine.images.get(tag).labels
        assert len(labels["org.agentmesh.binary-sha256"]) == 64, labels


@pytest.mark.asyncio
async def test_nats_jetstream_dedup_in_container(tmp_path: Path, engine: docker.DockerClient) -> None:
    import nats

    port = _free_port()
    store = tmp_path / "js-store"
    store.mkdir()
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    config = conf_dir / "nats.conf"
    config.write_text(
        f"""
listen: 127.0.0.1:{port}
server_name: smoke
jetstream {{
  store_dir: "{store}"
  sync_interval: always
}}
"""
    )
    name_prefix = f"agentmesh-nats-{port}-"

    with nats_container(config, store, port) as url:
        assert url == f"nats://127.0.0.1:{port}"
        assert len(_containers_named(engine, name_prefix)) == 1

        nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            await js.add_stream(name="SMOKE", subjects=["smoke.>"], duplicate_window=60)
            ids = [f"m{i}" for i in range(9)] + ["m3"]  # 10 publishes, the last one a duplicate
            acks = [
                await js.publish("smoke.x", f"payload {i}".encode(), headers={"Nats-Msg-Id": msg_id})
                for i, msg_id in enumerate(ids)
            ]
            assert [a.duplicate for a in acks] == [None] * 9 + [True], acks
            assert acks[-1].seq == acks[3].seq  # the duplicate is acked with the original's seq
            info = await js.stream_info("SMOKE")
            assert info.state.messages == 9
        finally:
            await nc.close()

        # sync_interval: always -> the store is on disk, in the bind-mounted host directory.
        assert any((store / "jetstream").rglob("*.blk")), sorted(store.rglob("*"))

    assert _containers_named(engine, name_prefix) == []


def test_redis_with_aclfile_in_container(tmp_path: Path, engine: docker.DockerClient) -> None:
    import redis

    port = _free_port()
    acl = tmp_path / "users.acl"
    acl.write_text("user default off\nuser smoke on >s3cret ~smoke:* +@all\n")
    args = ["--aclfile", str(acl), "--save", "", "--appendonly", "no"]

    with redis_container(port, args) as url:
        assert url == f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, username="smoke", password="s3cret", socket_timeout=5)
        try:
            assert client.set("smoke:key", "value") is True
            assert client.get("smoke:key") == b"value"
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.set("other:key", "x")  # the ACL file really was loaded
        finally:
            client.close()
    assert _containers_named(engine, f"agentmesh-redis-{port}-") == []


def test_container_is_removed_even_if_block_raises(engine: docker.DockerClient) -> None:
    build_redis_image()
    port = _free_port()
    container = RedisServerContainer(port)
    with pytest.raises(RuntimeError, match="boom"), container:
        container_id = container.get_container_id()
        engine.containers.get(container_id)  # exists while the block runs
        raise RuntimeError("boom")
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get(container_id)
    container.stop()  # a second stop is a no-op


def test_failed_start_leaves_nothing_behind(tmp_path: Path, engine: docker.DockerClient) -> None:
    """A server that exits at start-up (port already taken) raises, and is cleaned up."""
    with closing(socket.socket()) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = int(busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="exited"), redis_container(port):
            pytest.fail("redis started on a port that is in use")
    assert _containers_named(engine, f"agentmesh-redis-{port}-") == []
