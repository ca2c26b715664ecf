"""Service settings from the environment (prefix ``MESH_``); fail fast when incomplete."""

from __future__ import annotations

import logging
import math
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import nats.errors
import nats.js.errors
from pydantic import AliasChoices, BeforeValidator, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mesh_contracts import SERVICES
from mesh_contracts import topology as topo
from mesh_kit.errors import KitError


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


OptionalPath = Annotated[Path | None, BeforeValidator(_blank_is_none)]
"""A file or directory setting that may be left out: unset or empty in the environment is none."""


class ServiceSettings(BaseSettings):
    """What every service needs to join the mesh. ``meshctl up`` and the k8s manifests set these.

    Each service subclasses it with its own fields (``mesh_<service>/settings.py``); the
    service's entry point builds that class once (``run_service``). A field ``x_y`` is read from
    ``MESH_X_Y``; a field with a ``validation_alias`` from the variable(s) it names. The field
    docstrings are the settings tables in the READMEs (``python infra/settings_doc.py``)."""

    model_config = SettingsConfigDict(env_prefix="MESH_", extra="ignore", use_attribute_docstrings=True)

    service: str
    """Service identity; one of the six services (pinned by each service's entry point)."""
    principal: str = Field("", pattern=r"^([a-z0-9][a-z0-9-]{0,63})?$")
    """The identity it signs as if not the service's: a worker pool's ``worker-<pool>`` (issue 48)."""
    nats_url: str = "nats://127.0.0.1:4222"
    """One server, or a comma-separated list of a cluster's servers (any one reachable is enough;
    the client reconnects to the others when its server dies)."""
    creds_file: Path | None = None
    """NATS user credentials (.creds: JWT + nkey seed) of this service."""
    signing_key_file: Path
    """Ed25519 private key this service signs its messages with."""
    trust_bundle_file: Path
    """Public keys of every principal."""
    data_key_file: OptionalPath = None
    """The deployment's data key (64 hex, a mounted secret): it unwraps each tenant's data key, which seals the
    tenant's content at rest (``mesh_contracts.sealing``); without it, content is written clear, sealed refused."""
    tls_ca_file: Path | None = None
    """The CA certificate that signed the NATS servers' certificate: with it the connection is
    TLS and the server is verified against it (``meshctl init`` mints one for a local mesh)."""
    redis_url: str = ""
    """Redis for caches and fast counters (rebuildable state only). It holds a password: prefer
    ``MESH_REDIS_URL_FILE`` (a mounted secret) over the environment."""
    redis_url_file: Path | None = None
    """File holding the Redis URL; wins over ``MESH_REDIS_URL`` when set."""
    health_host: str = "127.0.0.1"
    """Address the health endpoint listens on."""
    health_port: int = Field(0, ge=0, le=65535)
    """HTTP port for /healthz, /readyz, /status; 0 disables the endpoint."""
    strict_contracts: bool = False
    """Reject unknown fields (tests run strict; production is tolerant)."""
    token_ttl_s: float = 300.0
    """Validity of the identity token on each message this service sends (receivers refuse a token
    that claims more than 540 s)."""
    graceful_timeout_s: float = 20.0
    """On SIGTERM, how long in-flight handlers may take to finish."""
    max_workers: int = Field(4, ge=1, le=256)
    """Concurrent handlers per durable in one process."""
    fair_window: int = Field(256, ge=0, le=4096)
    """Messages each durable fetches ahead and holds (kept alive) so its handlers can take the
    tenants in turn, and a tenant's higher-priority work first (``mesh_kit.fair``); 0 (or less
    than the handlers): no look-ahead, only as many as the handlers can take at once."""
    ack_wait_s: float = Field(topo.ACK_WAIT_S, gt=0)
    """The provisioned consumers' ack_wait (must match what ``meshctl provision`` set; ``meshctl
    up`` provisions with this variable): what a dead replica's messages wait before a live one gets
    them. A live one says every quarter of it, for each message it holds, that it is alive
    (``mesh_kit.fair``)."""
    handoff_file: str = ""
    """A file of this process's own where it lists the messages it holds, so that its successor
    (the same process restarted: ``meshctl up``'s supervisor, a container restarted in its pod on
    an ``emptyDir``) hands them back at once rather than after ``ack_wait`` (``mesh_host.handoff``).
    One per process; empty: none."""
    hold_max_s: float = Field(600.0, gt=0)
    """How long a handler may hold its message alive outside a long call (a model or tool call, a
    full stream: ``Delivery.keepalive``); one stuck longer stops being kept alive and its message
    goes to another replica after ``ack_wait`` (fencing keeps its effects single)."""
    max_deliver: int = Field(topo.MAX_DELIVER, ge=1, lt=topo.SERVER_MAX_DELIVER + 1)
    """Attempts before a failing message is dead-lettered (the provisioned consumer allows one more)."""
    request_timeout_s: float = Field(1.0, gt=0)
    """How long a request (the budget's reservation) waits for its answer, asked again within it
    (``mesh_host.ask``): a try waits a quarter of it (at least 0.25 s), so a request held
    by a responder killed meanwhile is asked again of the next one rather than waited out; while
    nobody listens (a responder restarting) it is asked again every 0.2 s at most. Past it the
    handler is re-run in place (requests are idempotent)."""
    infra_retry_s: float = Field(60.0, ge=0)
    """While the broker is unavailable (restart, failover), a handler is re-run in place for up
    to this long before the failure costs the message one of its ``MESH_MAX_DELIVER`` attempts."""
    retry_delays_s: tuple[float, ...] = topo.RETRY_DELAYS_S
    """NAK delay after each failed attempt (JSON list in the environment)."""
    decode_max_bytes: int = Field(0, ge=0)
    """Cap on any message body, below each contract's own limit (0: the contracts' limits)."""
    decode_max_depth: int = Field(64, ge=2, le=512)
    """Deepest JSON nesting a body may have (deeper: dead-lettered as ``decode: nesting deeper than ...``)."""
    decode_max_int_digits: int = Field(20, ge=1, le=4000)
    """Most digits an integer in a body may have."""
    rejection_log_per_min: int = Field(30, ge=0)
    """Warning lines per minute for rejected messages; the rest are summed in one line a minute."""
    identity_refresh_s: float = Field(1.0, gt=0)
    """How often the service looks for a rotated signing key in its key file (it switches once the
    published trust bundle trusts the new key)."""
    guard_view_s: float = Field(2.0, ge=0)
    """The guard (halt, cancel, kill switches) reads a task's status and the kill switches once and
    keeps them current from the buckets' republished feeds; it reads each again after this long
    anyway (the bound on how late a write is seen if its fed message were lost). 0: read both
    buckets before every model or tool call."""
    quota_share: float = Field(0.125, ge=0, le=1)
    """Of each capped stream a tenant's messages are stored in (TASK: its submissions; CONTROL: its
    halts, resumes and cancels; RAG: its ingests; DLQ: its dead letters, split evenly among the six
    services), the share of the cap (bytes, and messages where the stream caps them) one tenant may
    hold; over it the tenant is refused with ``quota_exceeded`` and the others are untouched. 0: no
    quota (``mesh_tenancy.quota``)."""
    quota_mib_per_min: dict[str, float] = {"TASK": 16.0, "CONTROL": 1.0, "RAG": 64.0, "DLQ": 4.0}
    """MiB a tenant may have stored per minute, per stream (JSON; the DLQ's split among the services);
    a stream not named has no rate limit. Over it: ``rate_limited`` with a ``retry_after_s``."""
    quota_tenants: dict[str, dict[str, dict[str, float]]] = {}
    """Per tenant and stream over the defaults, JSON: ``{"acme": {"RAG": {"mib": 2048, "msgs": 0,
    "mib_per_min": 256}}}`` (``mib``: bytes held, replacing the share; ``msgs``: messages held; 0: no limit)."""
    log_level: str = "INFO"
    """Python logging level (``DEBUG``, ``INFO``, ``WARNING``, ...)."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The process's event loop: uvloop (libuv, about a tenth less CPU per task) or the standard library's."""
    memory_trim_s: float = Field(30.0, ge=0)
    """How often the process hands memory it has freed back to the system (glibc ``malloc_trim``;
    ``mesh_host.memory``); 0: never. Without it a long-running service's resident memory creeps."""
    memory_mmap_kib: int = Field(64, ge=0, le=32768)
    """Blocks of this many KiB or more are mapped on their own and unmapped when freed (glibc
    ``mallopt(M_MMAP_THRESHOLD)``, ``mesh_host.memory``); 0: glibc's dynamic threshold, under which
    the budget's large transient tables fragmented its heap (+1.6 MB resident per 1,000 tasks)."""
    data_dir: Path | None = None
    """Service-specific data (e.g. the RAG service's sample documents)."""

    @field_validator("service")
    @classmethod
    def _known_service(cls, v: str) -> str:
        if v not in SERVICES:
            raise ValueError(f"unknown service {v!r}; expected one of {', '.join(SERVICES)}")
        return v

    @field_validator("quota_tenants")
    @classmethod
    def _known_quotas(cls, v: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
        """``{"<tenant>": {"<STREAM>": {"mib": .., "msgs": .., "mib_per_min": ..}}}``, streams with doors or the DLQ."""
        known = {*topo.door_streams(), topo.DLQ_STREAM}
        for tenant, streams in v.items():
            for stream, values in streams.items():
                if stream not in known:
                    raise ValueError(
                        f"tenant {tenant}: unknown stream {stream!r} (quotas apply to {', '.join(sorted(known))})"
                    )
                unknown = set(values) - {"mib", "msgs", "mib_per_min"}
                if unknown:
                    raise ValueError(f"tenant {tenant}, {stream}: unknown limit(s) {', '.join(sorted(unknown))}")
                if any(not math.isfinite(x) or x < 0 for x in values.values()):
                    raise ValueError(f"tenant {tenant}, {stream}: limits must be >= 0")
        return v

    @model_validator(mode="after")
    def _redis_from_file(self) -> ServiceSettings:
        if self.redis_url_file is not None:
            self.redis_url = self.redis_url_file.read_text().strip()
        return self

    @classmethod
    def env_names(cls, field: str) -> tuple[str, ...]:
        """The environment variable(s) ``field`` is read from, in the order they are tried."""
        alias = cls.model_fields[field].validation_alias
        if isinstance(alias, str):
            return (alias,)
        if isinstance(alias, AliasChoices):
            return tuple(c for c in alias.choices if isinstance(c, str))
        return ((cls.model_config.get("env_prefix", "") + field).upper(),)

    @classmethod
    def error_line(cls, exc: ValidationError) -> str:
        """The first error as one line that names its variable: ``MESH_MAX_WORKERS: Input should be ...``."""
        first = exc.errors()[0]
        msg = " ".join(str(first["msg"]).removeprefix("Value error, ").split())
        if not first["loc"]:
            return msg  # a check across fields: its message names the variable
        key = str(first["loc"][0])
        name = cls.env_names(key)[0] if key in cls.model_fields else key.upper()
        return msg if msg.startswith(name) else f"{name}: {msg}"

    @classmethod
    def defaults(cls) -> Self:
        """This class's own fields at their defaults, read from nowhere and not validated: what a
        service object built outside ``run_service`` (by a test or a benchmark) runs with. The
        mesh fields (identity, NATS, Redis) stay unset: a service reads those from its ``Mesh``."""
        return cls.model_construct()  # type: ignore[return-value]  # pydantic types it as the base class

    @property
    def nats_servers(self) -> list[str]:
        return nats_servers(self.nats_url)

    @property
    def inbox_prefix(self) -> str:
        """Per-service reply inbox; the policy lets only this service subscribe to it."""
        return inbox_prefix(self.service)


class _QuietTlsEof(logging.Filter):
    """asyncio warns "returning true from eof_received() has no effect when using ssl" each time
    nats-py's TLS connection closes: harmless (nats-py's protocol predates its TLS use), and on
    a CLI it is a stray line on stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "eof_received()" not in record.getMessage()


def tls_context(ca_file: Path | str | None) -> ssl.SSLContext | None:
    """A client TLS context that trusts ``ca_file`` only (None without one: plain connections)."""
    if not ca_file:
        return None
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _QuietTlsEof) for f in asyncio_log.filters):
        asyncio_log.addFilter(_QuietTlsEof())
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def inbox_prefix(principal: str) -> str:
    return "_INBOX_" + principal.replace(".", "_").replace("-", "_")


def nats_servers(url: str) -> list[str]:
    """``nats://a:4222,nats://b:4222`` -> both URLs (the NATS convention for a cluster's seeds)."""
    return [u.strip() for u in url.split(",") if u.strip()]


async def log_nats_error(exc: Exception) -> None:
    """``error_cb`` for short-lived clients (CLI, tenant clients): a refused connection to one
    node of a cluster is expected while it is down, and the client moves on to the next; the
    nats-py default prints a traceback for it."""
    logging.getLogger("nats").debug("nats: %s", exc)


BROKER_UNAVAILABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)
"""Failures of the broker, not of the message: a restart, a failover, a leader election.
Retrying is safe wherever the operation is idempotent (a publish under a deterministic
message id, a compare-and-set handler)."""

STREAM_FULL_CODE = 10077
"""JetStream's answer to a publish into a stream at one of its caps (``maximum messages
exceeded``, ``maximum bytes exceeded``, ``... per subject exceeded``) with ``discard: new``."""


class StreamFull(nats.js.errors.ServiceUnavailableError, KitError):
    """A stream at its cap refused the message: nothing was stored. The mesh's streams refuse
    new messages when full rather than forget old ones, so this passes only once something
    ages out or an operator raises the cap (``meshctl provision --stream-max-mib``)."""

    def __init__(self, stream: str, description: str) -> None:
        super().__init__(code=503, description=description, err_code=STREAM_FULL_CODE, stream=stream)

    def __str__(self) -> str:
        return f"stream {self.stream} is full ({self.description}): nothing was stored"

    @classmethod
    def of(cls, exc: BaseException, stream: str) -> StreamFull | None:
        """``exc`` as a ``StreamFull`` if that is what the broker said, else None."""
        if isinstance(exc, nats.js.errors.APIError) and exc.err_code == STREAM_FULL_CODE:
            return cls(stream, exc.description or "full")
        return None
