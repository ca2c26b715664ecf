"""Create streams, durable consumers, KV buckets and the dead-letter stream (admin identity).

Idempotent: running it again reconciles consumer configuration (provisioning, not the
services, owns it; a subscriber binding an existing durable never updates it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypedDict

import nats
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

from mesh_contracts import topology as topo
from mesh_identity import TrustBundle
from mesh_kit.settings import log_nats_error, nats_servers
from meshctl.identity import Identities

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
RECORD_RETENTION_S = 0.0
"""How long per-task records (KV ``tasks``, ``steps``, ``status``: ``Bucket.records``) are kept:
``--record-retention-days``; 0 keeps them until deleted. Never shorter than the messages'
retention: a task's status must outlive every stored message about it (a late redelivery of an
ended task's step is stopped by it)."""
MIB = 1 << 20
STREAM_MAX_BYTES = 512 * MIB
"""Each work stream's (and the dead-letter stream's) cap on stored bytes: ``--stream-max-mib``.
At the cap the stream refuses new messages (``discard: new``) and keeps every stored one: work in
hand waits in place, the planner refuses new tasks from 90% (``overloaded``), a client's
submission into a full TASK stream is refused at once. JetStream reserves a stream's cap on the
server's store, so the caps together must fit in its ``max_file_store`` (8 GB for ``meshctl
up``, 7.45 GiB: nine work streams, ENVELOPES and the DLQ at 512 MiB plus the audit chain at 1 GiB
is 6.5 GiB)."""
AUDIT_MAX_BYTES = 1024 * MIB
"""The audit chain's cap: ``--audit-max-mib``. At it, the services that append (tool effects,
approvals, budget trips) wait rather than act unrecorded."""


@dataclass
class ProvisionReport:
    streams: list[str]
    consumers: list[str]
    buckets: list[str]
    notes: list[str] = field(default_factory=list)
    """What provisioning could not make as configured (and why), for the operator."""


class StreamCaps(TypedDict):
    """A stream's bounds as ``StreamConfig`` keywords (-1: none)."""

    max_bytes: int
    max_msgs: int


class ConsumerLag(TypedDict):
    """One durable's backlog (``consumer_lag``); -1 counts where its leader did not answer."""

    service: str
    pending: int
    ack_pending: int
    redelivered: int


@dataclass(frozen=True)
class Caps:
    """Bounds on what the mesh's streams hold (0: none); at a bound, new messages are refused."""

    max_bytes: int = STREAM_MAX_BYTES
    audit_max_bytes: int = AUDIT_MAX_BYTES
    max_msgs: int = 0

    def of(self, stream: str) -> StreamCaps:
        size = self.audit_max_bytes if stream == AUDIT else self.max_bytes
        return {"max_bytes": size or -1, "max_msgs": self.max_msgs or -1}


def stream_configs(
    replicas: int = 1, *, retention_s: float = RETENTION_S, audit_retention_s: float = AUDIT_RETENTION_S,
    caps: Caps = Caps(),
) -> list[api.StreamConfig]:  # fmt: skip
    configs = [
        api.StreamConfig(
            name=stream,
            subjects=[f"{domain}.>"],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            duplicate_window=DEDUP_WINDOW_S,
            max_age=audit_retention_s if stream == AUDIT else retention_s,
            # Bounded, and full means "no more", never "forget the oldest": a stored message is
            # work somebody was promised (or a record somebody must be able to show).
            discard=api.DiscardPolicy.NEW,
            **caps.of(stream),
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
            persist_mode=persist_mode(stream not in topo.UNSYNCED, replicas),
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
            discard=api.DiscardPolicy.NEW,
            **caps.of(topo.DLQ_STREAM),
            num_replicas=replicas,
            allow_direct=True,  # the keeper finds where a tenant's kept dead letters begin (issue 42)
            description="Dead letters: original body and headers, reason, attempts, original subject",
        )
    )
    configs.append(
        api.StreamConfig(
            name=topo.TIMERS,
            subjects=[topo.timer_subject("*", "*", "*", "at"), topo.timer_subject("*", "*", "*", "due")],
            storage=api.StorageType.FILE,
            # What is stored is a pending wake-up: a schedule (purged by the broker when it fires)
            # or a fired one (removed once the planner acknowledges it). Nothing else is kept.
            retention=api.RetentionPolicy.WORK_QUEUE,
            allow_msg_schedules=True,
            num_replicas=replicas,
            max_msg_size=4 * 1024,
            description="Durable timers of workflow tasks: the planner's schedules and the wake-ups they fire",
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


def persist_mode(synced: bool, replicas: int) -> api.PersistMode | None:
    """How a stream (or a bucket's stream) is persisted: synced per message (the default), or, for
    what no guarantee rests on (``topology.UNSYNCED``, ``Bucket.synced``), written back
    asynchronously. The broker refuses async persistence on a replicated stream: there the
    replicas are the durability."""
    return api.PersistMode.ASYNC if not synced and replicas == 1 else None


async def _create_unsynced_bucket(js: JetStreamContext, kv: api.KeyValueConfig) -> None:
    """A KV bucket whose writes the broker persists asynchronously (``Bucket.synced`` false): the
    stream ``create_key_value`` makes, with ``persist_mode: async`` (which it cannot set, and
    which no update can set later)."""
    await js.add_stream(
        api.StreamConfig(
            name=f"KV_{kv.bucket}",
            description=kv.description,
            subjects=[f"$KV.{kv.bucket}.>"],
            allow_direct=kv.direct,
            allow_rollup_hdrs=True,
            allow_msg_ttl=True,
            deny_delete=True,
            discard=api.DiscardPolicy.NEW,
            duplicate_window=min(120.0, kv.ttl or 120.0),
            max_age=kv.ttl,
            max_consumers=-1,
            max_msgs=-1,
            max_msgs_per_subject=kv.history,
            num_replicas=kv.replicas,
            storage=kv.storage,
            republish=kv.republish,
            persist_mode=api.PersistMode.ASYNC,
        )
    )


def _keeping_persist_mode(cfg: api.StreamConfig, now: api.StreamConfig, report: ProvisionReport) -> api.StreamConfig:
    """``cfg`` with the persist mode the stream was made with (the broker cannot change it)."""
    want, has = _mode(cfg.persist_mode), _mode(now.persist_mode)
    if want == has:
        return cfg
    report.notes.append(
        f"{cfg.name} was made with persist mode {has}, not {want}, and the broker cannot change it: "
        f"it stays {has} until the stream is made again (delete it and provision)"
    )
    return dataclasses.replace(cfg, persist_mode=None if has == "default" else api.PersistMode(has))


def _mode(mode: api.PersistMode | str | None) -> str:
    """A persist mode as its name (the server leaves the default out; nats-py reads a string back)."""
    return str(getattr(mode, "value", mode) or api.PersistMode.DEFAULT.value)


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
    nc: NATS, *, replicas: int = 1, ack_wait_s: float = topo.ACK_WAIT_S, retention_s: float = RETENTION_S,
    audit_retention_s: float = AUDIT_RETENTION_S, record_retention_s: float = RECORD_RETENTION_S,
    caps: Caps = Caps(), pools: list[str] | tuple[str, ...] = (),
) -> ProvisionReport:  # fmt: skip
    """``pools``: the worker pools whose own durables are made too (``topology.pool_durables``).
    ``ack_wait_s`` must match the services' MESH_ACK_WAIT_S (their heartbeat interval derives from it).
    Lowering a cap below what a stream holds keeps every message (``discard: new`` refuses only
    new ones); the stream takes nothing more until it is under the cap again. ``ValueError`` for
    a record retention shorter than the messages'."""
    if record_retention_s and record_retention_s < retention_s:
        raise ValueError(
            f"task records would be kept {record_retention_s / 86400:g} days, less than the {retention_s / 86400:g} "
            "days task messages are kept: a task's status must outlive every message about it"
        )
    js = nc.jetstream()
    report = ProvisionReport([], [], [])
    for cfg in stream_configs(replicas, retention_s=retention_s, audit_retention_s=audit_retention_s, caps=caps):
        # Update an existing stream rather than try to add it again: the server checks an add's
        # cap against the store before it sees the name is taken, and the caps of every stream
        # already reserved would not leave room for a second copy of one.
        try:
            info = await js.stream_info(cfg.name or "")
        except NotFoundError:
            await js.add_stream(cfg)
        else:
            await js.update_stream(_keeping_persist_mode(cfg, info.config, report))
        report.streams.append(cfg.name or "")
    await provision_envelopes(js, report, replicas=replicas, retention_s=retention_s, caps=caps)
    # Buckets before durables: a service waits for its durables (Mesh.start), so once they
    # exist, every bucket it uses does too.
    for b in topo.BUCKETS:
        republish = api.RePublish(src=f"$KV.{b.name}.>", dest=topo.watch_feed(f"KV_{b.name}")) if b.fed else None
        ttl = record_retention_s if b.records else b.ttl_s
        kv = api.KeyValueConfig(
            bucket=b.name,
            history=b.history,
            storage=api.StorageType.FILE,
            replicas=replicas,
            description=b.description,
            direct=True,
            ttl=ttl or None,
            republish=republish,
        )
        try:
            info = await js.stream_info(f"KV_{b.name}")
        except NotFoundError:
            if persist_mode(b.synced, replicas) is None:
                await js.create_key_value(kv)
            else:
                await _create_unsynced_bucket(js, kv)
        else:  # provisioned before, perhaps with another configuration: reconcile
            info.config.republish = republish
            info.config.description = b.description
            info.config.max_age = ttl or 0  # a retention changed since: provisioning owns it
            await js.update_stream(info.config)
        report.buckets.append(b.name)
    for d in [*topo.durables(), *(d for pool in pools for d in topo.pool_durables(pool))]:
        await js.add_consumer(d.stream, consumer_config(d, replicas, ack_wait_s))  # create or update
        report.consumers.append(f"{d.stream}/{d.name}")
    await js.add_consumer(topo.TIMERS, timer_consumer_config(replicas, ack_wait_s))
    report.consumers.append(f"{topo.TIMERS}/{topo.TIMER_DURABLE}")
    return report


def timer_consumer_config(replicas: int = 1, ack_wait_s: float = topo.ACK_WAIT_S) -> api.ConsumerConfig:
    """The planner's durable for fired wake-ups (``topology.TIMERS``). No cap on deliveries: a
    wake-up is handled by reading a record, and one that is never handled is a timer that never
    fires; many may wait at once (one per waiting task)."""
    return api.ConsumerConfig(
        name=topo.TIMER_DURABLE,
        durable_name=topo.TIMER_DURABLE,
        filter_subject=topo.timer_subject("*", "*", "*", "due"),
        ack_policy=api.AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_ack_pending=10_000,
        deliver_policy=api.DeliverPolicy.ALL,
        num_replicas=replicas,
        description="planner takes the wake-ups of workflow timers",
    )


ENVELOPE_MAX_ACK_PENDING = 10_000
"""Envelopes in flight from one stream to ENVELOPES (flow control acknowledges them in rounds)."""


def envelope_consumer_config(domain: str, replicas: int = 1) -> api.ConsumerConfig:
    """The headers-only durable ENVELOPES sources ``domain``'s stream through: whatever it
    delivers has no body (``headers_only``), so what ENVELOPES stores never holds one. A push
    consumer acknowledged by flow control (nats-server 2.14's durable sourcing); no principal
    holds a right on it, the server's sourcing alone consumes it. It starts from when it is
    made: a mesh that had none does not copy its history into ENVELOPES stamped with today's
    time (a sourced copy is stamped when ENVELOPES stores it)."""
    name, deliver = topo.envelope_source(domain)
    return api.ConsumerConfig(
        name=name,
        durable_name=name,
        deliver_subject=deliver,
        headers_only=True,
        ack_policy=api.AckPolicy.FLOW_CONTROL,
        flow_control=True,
        idle_heartbeat=1.0,  # what the server requires of a flow-controlled sourcing durable
        max_ack_pending=ENVELOPE_MAX_ACK_PENDING,
        deliver_policy=api.DeliverPolicy.BY_START_TIME,
        opt_start_time=datetime.now(UTC),
        num_replicas=replicas,
        description=f"ENVELOPES sources {topo.STREAMS[domain]} through it: headers only, never a body",
    )


def envelopes_config(replicas: int = 1, *, retention_s: float = RETENTION_S, caps: Caps = Caps()) -> api.StreamConfig:
    """Every message of the enveloped domains without its body (``topology.ENVELOPES``): what the
    budget's monitor reads instead of the streams themselves. A view the broker derives: at its cap
    it forgets its oldest envelopes (``discard: old``) rather than stall the sourcing."""
    sources = []
    for domain in topo.ENVELOPED:
        name, deliver = topo.envelope_source(domain)
        sources.append(api.StreamSource(
            name=topo.STREAMS[domain], consumer=api.StreamConsumerSource(name=name, deliver_subject=deliver)
        ))  # fmt: skip
    return api.StreamConfig(
        name=topo.ENVELOPES,
        sources=sources,
        storage=api.StorageType.FILE,
        retention=api.RetentionPolicy.LIMITS,
        duplicate_window=DEDUP_WINDOW_S,  # as its sources: one id is one logical message
        max_age=retention_s,
        discard=api.DiscardPolicy.OLD,
        **caps.of(topo.ENVELOPES),
        num_replicas=replicas,
        allow_direct=True,
        republish=api.RePublish(src=">", dest=topo.watch_feed(topo.ENVELOPES)),
        # Written back asynchronously (``topology.UNSYNCED``): what a crash loses of it the broker
        # sources again (it resets each durable to the last sequence it holds). Synced, it cost
        # nats-server 0.13 ms more per message, and the budget more too (it was fed one message at
        # a time instead of in bursts).
        persist_mode=persist_mode(topo.ENVELOPES not in topo.UNSYNCED, replicas),
        description="AgentMesh envelopes: every task, step, tool, rag, check, control and approval message's "
        "headers, without its body (sourced through headers-only durables)",
    )


async def provision_envelopes(
    js: JetStreamContext, report: ProvisionReport, *, replicas: int = 1, retention_s: float = RETENTION_S,
    caps: Caps = Caps(),
) -> None:  # fmt: skip
    """The sourcing durables (made once: a durable's start cannot change), then ENVELOPES."""
    for domain in topo.ENVELOPED:
        stream, (name, _) = topo.STREAMS[domain], topo.envelope_source(domain)
        try:
            await js.consumer_info(stream, name)
        except NotFoundError:
            await js.add_consumer(stream, envelope_consumer_config(domain, replicas))
        report.consumers.append(f"{stream}/{name}")
    cfg = envelopes_config(replicas, retention_s=retention_s, caps=caps)
    try:
        await js.stream_info(topo.ENVELOPES)
    except NotFoundError:
        await js.add_stream(cfg)
    else:
        await js.update_stream(cfg)
    report.streams.append(topo.ENVELOPES)


async def store_levels(nc: NATS) -> dict[str, dict[str, float]]:
    """Per stream of the mesh: messages and bytes held, its caps (-1: none) and how full it is
    (the larger share of a cap); the planner refuses new tasks from ``MESH_STORE_HIGH_WATER``."""
    js = nc.jetstream()
    out: dict[str, dict[str, float]] = {}
    for stream in [*topo.STREAMS.values(), topo.DLQ_STREAM]:
        try:
            info = await js.stream_info(stream)
        except Exception:  # noqa: BLE001, S112 - not provisioned (yet), or its leader did not answer: not listed
            continue
        st, max_bytes, max_msgs = info.state, info.config.max_bytes or 0, info.config.max_msgs or 0
        shares = [st.bytes / max_bytes if max_bytes > 0 else 0.0,
                  st.messages / max_msgs if max_msgs > 0 else 0.0]  # fmt: skip
        out[stream] = {
            "messages": st.messages, "bytes": st.bytes, "max_msgs": max_msgs or -1,
            "max_bytes": max_bytes or -1, "full": round(max(shares), 4),
        }  # fmt: skip
    return out


async def consumer_lag(nc: NATS) -> dict[str, ConsumerLag]:
    """Per durable: pending (not yet delivered) and ack-pending (in flight). KEDA's lag = sum.
    -1 where the consumer's leader did not answer in time."""
    js = nc.jetstream()
    out: dict[str, ConsumerLag] = {}
    for d in topo.durables():
        try:
            info = await js.consumer_info(d.stream, d.name, timeout=2.0)
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError):
            # No answer, or "JetStream system temporarily unavailable": in a cluster, usually a
            # leader election after a node died (seconds).
            out[d.name] = {"service": d.service, "pending": -1, "ack_pending": -1, "redelivered": -1}
            continue
        out[d.name] = {
            "service": d.service,
            "pending": info.num_pending or 0,
            "ack_pending": info.num_ack_pending or 0,
            "redelivered": info.num_redelivered or 0,
        }
    return out


PEER_OFFLINE = 10005  # JetStream: "no suitable peers for placement, peer offline"
JS_NOT_ENABLED_FOR_ACCOUNT = 10039  # a cluster whose account assignment has not settled yet


async def provision_as_admin(
    ids: Identities, nats_url: str, replicas: int = 1, ack_wait_s: float | None = None
) -> None:
    nc = await nats.connect(
        nats_servers(nats_url), name="meshctl-provision", error_cb=log_nats_error, **ids.connect_options("admin")
    )
    try:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                await provision(nc, replicas=replicas, ack_wait_s=ack_wait_s or topo.ACK_WAIT_S, pools=ids.pools())
                break
            except (nats.js.errors.BadRequestError, nats.js.errors.ServiceUnavailableError) as exc:
                # A cluster whose nodes are healthy can still have a peer the meta leader has not
                # heard from yet (routes are TLS handshakes): placement is refused meanwhile. Just
                # after the meta leader is elected, the account's JetStream may not be assigned
                # yet either ("JetStream not enabled for account", seen once in CI). Provisioning
                # is idempotent, so try again until the cluster has settled.
                if exc.err_code not in (PEER_OFFLINE, JS_NOT_ENABLED_FOR_ACCOUNT) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
            except nats.errors.TimeoutError:
                # A new cluster's meta leader can take longer than one API request's timeout to
                # place a replicated stream: the same settling, told as a timeout.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()
    if ids.signing_key("admin").exists():
        from meshctl.rotation import publish_bundle

        bundle = TrustBundle.from_file(ids.trust_bundle)
        while True:
            try:
                await publish_bundle(ids, bundle, nats_servers(nats_url), only_if_newer=True)
                break
            except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
                # The trust bucket was created a moment ago: on a new cluster its replicas may not
                # have elected a leader yet, and the write times out (CI saw `meshctl up --cluster 3`
                # fail so, 1 run in 10). Publishing is idempotent: try again until it settles.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
