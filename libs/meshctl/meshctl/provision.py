"""Create streams, durable consumers, KV buckets and the dead-letter stream (admin identity).

Idempotent: running it again reconciles consumer configuration (provisioning, not the
services, owns it; a subscriber binding an existing durable never updates it).
"""

from __future__ import annotations

from dataclasses import dataclass

import nats
from nats.js import api
from nats.js.errors import BadRequestError

from mesh_contracts import topology as topo

AUDIT = topo.STREAMS["audit"]

DEDUP_WINDOW_S = 600.0
"""Covers any publisher retry horizon (broker restarts included); longer redeliveries are
caught by the consumer-side idempotency ledger."""
RETENTION_S = 7 * 24 * 3600.0
"""How long task messages (every stream but the audit chain) are kept: ``--retention-days``."""
AUDIT_RETENTION_S = 365 * 24 * 3600.0
"""How long the audit chain is kept (a year, what compliance regimes commonly ask):
``--audit-retention-days``. The stream refuses deletes and purges; only age removes records."""
DLQ_RETENTION_S = 30 * 24 * 3600.0


@dataclass
class ProvisionReport:
    streams: list[str]
    consumers: list[str]
    buckets: list[str]


def stream_configs(
    replicas: int = 1, *, retention_s: float = RETENTION_S, audit_retention_s: float = AUDIT_RETENTION_S
) -> list[api.StreamConfig]:
    configs = [
        api.StreamConfig(
            name=stream,
            subjects=[f"{domain}.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=DEDUP_WINDOW_S,
            max_age=audit_retention_s if stream == AUDIT else retention_s,
            num_replicas=replicas,
            # Tamper evidence, first line: no API may delete or purge a record (and no update can
            # take that back); the hash chain (``meshctl audit verify``) shows what remains.
            deny_delete=stream == AUDIT,
            deny_purge=stream == AUDIT,
            # Direct gets: tenant clients catch up on TASK and EVENTS, the budget's monitor reads
            # the streams it watches (no consumers). Who may is a matter of permissions.
            allow_direct=True,
            max_msg_size=topo.max_message_bytes(domain),
            republish=(
                api.RePublish(src=f"{domain}.>", dest=topo.watch_feed(stream))
                if stream in topo.watched_streams()
                else None
            ),
            description=f"AgentMesh {domain} messages (all contract versions)",
        )
        for domain, stream in topo.STREAMS.items()
    ]
    configs.append(
        api.StreamConfig(
            name=topo.DLQ_STREAM,
            # In-app dead letters, plus the server's advisory when a consumer crashed on every
            # attempt and so could never dead-letter the message itself.
            subjects=[f"{topo.DLQ_PREFIX}.>", "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=DEDUP_WINDOW_S,
            max_age=DLQ_RETENTION_S,
            num_replicas=replicas,
            description="Dead letters: original body and headers, reason, attempts, original subject",
        )
    )
    for stream, (prefix, writer) in topo.SINKS.items():
        configs.append(
            api.StreamConfig(
                name=stream,
                subjects=[f"{prefix}.>"],
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                duplicate_window=DEDUP_WINDOW_S,
                max_age=RETENTION_S,
                num_replicas=replicas,
                description=f"Side-effect sink written by {writer}: one stored message per observed effect",
            )
        )
    return configs


def consumer_config(d: topo.Durable, replicas: int = 1, ack_wait_s: float = topo.ACK_WAIT_S) -> api.ConsumerConfig:
    return api.ConsumerConfig(
        name=d.name,
        durable_name=d.name,
        filter_subject=d.filter_subject,
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_deliver=topo.SERVER_MAX_DELIVER,
        max_ack_pending=1000,
        deliver_policy=api.DeliverPolicy.ALL,
        num_replicas=replicas,
        description=f"{d.service} consumes {d.contract.type_name()}",
    )


async def provision(
    nc: nats.NATS, *, replicas: int = 1, ack_wait_s: float = topo.ACK_WAIT_S, retention_s: float = RETENTION_S,
    audit_retention_s: float = AUDIT_RETENTION_S,
) -> ProvisionReport:  # fmt: skip
    """``ack_wait_s`` must match the services' MESH_ACK_WAIT_S (their heartbeat interval derives from it)."""
    js = nc.jetstream()
    report = ProvisionReport([], [], [])
    for cfg in stream_configs(replicas, retention_s=retention_s, audit_retention_s=audit_retention_s):
        try:
            await js.add_stream(cfg)
        except BadRequestError as exc:
            if exc.err_code != 10058:  # stream name already in use with a different configuration
                raise
            await js.update_stream(cfg)
        report.streams.append(cfg.name or "")
    # Buckets before durables: a service waits for its durables (Mesh.start), so once they
    # exist, every bucket it uses does too.
    for b in topo.BUCKETS:
        republish = api.RePublish(src=f"$KV.{b.name}.>", dest=topo.watch_feed(f"KV_{b.name}")) if b.fed else None
        try:
            await js.create_key_value(
                api.KeyValueConfig(
                    bucket=b.name,
                    history=b.history,
                    storage=api.StorageType.FILE,
                    replicas=replicas,
                    description=b.description,
                    direct=True,
                    ttl=b.ttl_s or None,
                    republish=republish,
                )
            )
        except BadRequestError as exc:
            if exc.err_code != 10058:  # provisioned before with another configuration: reconcile
                raise
            info = await js.stream_info(f"KV_{b.name}")
            info.config.republish = republish
            info.config.description = b.description
            await js.update_stream(info.config)
        report.buckets.append(b.name)
    for d in topo.durables():
        await js.add_consumer(d.stream, consumer_config(d, replicas, ack_wait_s))  # create or update
        report.consumers.append(f"{d.stream}/{d.name}")
    return report


async def consumer_lag(nc: nats.NATS) -> dict[str, dict[str, int]]:
    """Per durable: pending (not yet delivered) and ack-pending (in flight). KEDA's lag = sum.
    -1 where the consumer's leader did not answer in time."""
    js = nc.jetstream()
    out: dict[str, dict[str, int]] = {}
    for d in topo.durables():
        try:
            info = await js.consumer_info(d.stream, d.name, timeout=2.0)
        except nats.errors.TimeoutError:
            # No answer: in a cluster, usually a leader election after a node died (seconds).
            out[d.name] = {"service": d.service, "pending": -1, "ack_pending": -1, "redelivered": -1}
            continue
        out[d.name] = {
            "service": d.service,
            "pending": info.num_pending or 0,  # type: ignore[dict-item]
            "ack_pending": info.num_ack_pending or 0,
            "redelivered": info.num_redelivered or 0,
        }
    return out
