"""Render what docker compose and the NATS Helm chart read, from a mesh home made by `meshctl init`.

`meshctl init` mints identities but writes no server-side inputs: no NATS auth include, no
Redis ACL, no Redis URLs that name a host other than 127.0.0.1. This stopgap writes them under
the mesh home (never into the repository) until meshctl grows the same commands:

    .venv/bin/python infra/render.py nats-auth   # <home>/nats/auth.conf + helm-auth-values.yaml
    .venv/bin/python infra/render.py compose     # nats-auth, plus <home>/compose/ for compose
    .venv/bin/python infra/render.py redis --host redis.agentmesh.svc.cluster.local --out DIR
    .venv/bin/python infra/render.py helm        # <home>/helm/identity-values.yaml for infra/helm/agentmesh
    .venv/bin/python infra/render.py edge --out DIR   # DIR/edge/: the edge's creds and tenant keys (kustomize)
    .venv/bin/python infra/render.py a2a --out DIR    # DIR/a2a/: the A2A gateway's, the same way

Nothing secret is printed. Files holding passwords are written 0600.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from meshctl.identity import Identities
from meshctl.local import REDIS_SERVICES, SERVICES, redis_users

COMPOSE_REDIS_HOST = "redis"  # the service name in docker-compose.yml
REDIS_PORT = 6379


def auth_conf(ids: Identities) -> str:
    """Operator-mode settings only (no listen, no JetStream): the chart and compose.conf own those.

    The operator and account JWTs are signed, not secret; the account *keys* never leave the home.
    """
    secrets = ids.secrets
    preload = json.loads((secrets / "preload.json").read_text())
    system = json.loads((secrets / "account.json").read_text())["system"]
    accounts = "\n".join(f"  {pub}: {jwt}" for pub, jwt in preload.items())
    return (
        "# Rendered by infra/render.py from the mesh home; do not edit. Contains no secrets.\n"
        f"operator: {(secrets / 'operator.jwt').read_text().strip()}\n"
        f"system_account: {system}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n{accounts}\n}}\n"
    )


def write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def render_nats_auth(ids: Identities) -> list[Path]:
    conf = ids.home / "nats" / "auth.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    text = auth_conf(ids)
    conf.write_text(text)
    # JSON is YAML: `helm -f` reads it, and it adds auth.conf to the chart's ConfigMap, where
    # `config.merge: {00$include: auth.conf}` in infra/nats/helm-values.yaml includes it.
    values = ids.home / "nats" / "helm-auth-values.yaml"
    values.write_text(json.dumps({"configMap": {"merge": {"data": {"auth.conf": text}}}}, indent=2) + "\n")
    return [conf, values]


def render_redis(ids: Identities, host: str, port: int, out: Path) -> dict[str, str]:
    """A Redis ACL file and one URL per principal, for a Redis reached at ``host:port``.

    Reuses meshctl's own ACL rules (one user per service, confined to its key prefix, no default
    user) by pointing it at ``out`` as if it were a mesh home, then rewrites the host it names.
    """
    scratch = Identities(out)
    redis_users(scratch, port)
    urls = {}
    for url_file in sorted((scratch.secrets / "redis").glob("*.url")):
        url = url_file.read_text().replace(f"@127.0.0.1:{port}/", f"@{host}:{port}/")
        write_secret(url_file, url)
        urls[url_file.stem] = url
    return urls


def edge_tenant_keys(
    ids: Identities, tenants: list[str] | None = None, approvers: bool = False
) -> dict[str, dict[str, str]]:
    """What the edge holds of each tenant it serves (all the home's tenants unless named): the
    tenant client's signing key and the tenant's data key, file name -> content, and with
    ``approvers`` the keys of the tenant's people who approve from the browser
    (``approver.<tenant>.<person>.pem``, `meshctl approvers add`). A tenant named without both
    keys in the home is an error."""
    keys = ids.secrets / "keys"
    out: dict[str, dict[str, str]] = {}
    for tenant in tenants if tenants is not None else ids.tenants():
        files = [keys / f"client.{tenant}.pem", ids.tenant_data_key(tenant)]
        if missing := [f.name for f in files if not f.exists()]:
            if tenants is None:
                continue  # a tenant of the home without a client (removed): nothing to serve
            raise ValueError(f"tenant {tenant}: no {', '.join(missing)} in {keys}")
        if approvers:
            files += sorted(keys.glob(f"approver.{tenant}.*.pem"))
        out[tenant] = {f.name: f.read_text() for f in files}
    return out


def edge_creds(ids: Identities, gateway: str = "edge") -> str:
    """A gateway's NATS credentials (the edge's, or the A2A gateway's: ``gateway="a2a"``)."""
    creds = ids.creds(gateway)
    if not creds.exists():
        raise ValueError(f"no {creds.name} in {creds.parent}: run `meshctl init` again (it mints the {gateway}'s)")
    return creds.read_text()


def render_edge(
    ids: Identities, out: Path, tenants: list[str] | None = None, approvers: bool = False, gateway: str = "edge"
) -> list[Path]:
    """A gateway's files for the kustomize path (the edge's; the A2A gateway's with
    ``gateway="a2a"``), 0600: ``out/<gateway>/nats.creds`` (Secret agentmesh-<gateway>-identity) and
    ``out/<gateway>/tenants/`` (Secret agentmesh-<gateway>-tenants, one key per file: ``kubectl
    create secret generic ... --from-file=out/<gateway>/tenants``). The folder is rewritten, so a
    tenant left out is no longer there."""
    edge = out / gateway
    keys = edge_tenant_keys(ids, tenants, approvers)  # first: a tenant without keys changes nothing
    write_secret(edge / "nats.creds", edge_creds(ids, gateway))
    folder = edge / "tenants"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in folder.iterdir():
        old.unlink()
    for files in keys.values():
        for name, text in files.items():
            write_secret(folder / name, text)
    return [edge / "nats.creds", folder]


def render_compose(ids: Identities) -> list[Path]:
    written = render_nats_auth(ids)
    out = ids.home / "compose"
    urls = render_redis(ids, COMPOSE_REDIS_HOST, REDIS_PORT, out)
    store = out / "jetstream"
    store.mkdir(parents=True, exist_ok=True)  # bind-mounted at /data; must exist and be ours
    # The edge: its creds and the tenants' keys (not the home's whole keys folder, which holds
    # every service's signing key), and the dev issuer `meshctl edge token` signs with.
    written += render_edge(ids, out, approvers=True)
    written += render_edge(ids, out, approvers=True, gateway="a2a")  # the A2A gateway's, the same way
    from meshctl.edge import issuer_key

    issuer_key(ids)  # secrets/keys/edge-issuer.pem, its public half edge-issuer.pub.pem beside it
    env = out / "compose.env"
    # Containers run as the invoking user because compose bind-mounts the 0600 identity files
    # with their host owner (compose secrets cannot change uid or mode for file sources).
    write_secret(
        env,
        f"MESH_HOME={ids.home}\n"
        f"MESH_UID={os.getuid()}\n"
        f"MESH_GID={os.getgid()}\n"
        f"MESH_TENANTS={','.join(ids.tenants())}\n"
        f"MESH_BUDGET_REDIS_URL={urls['budget']}\n"
        f"MESH_RAG_REDIS_URL={urls['rag']}\n"
        f"MESH_TOOL_EXECUTOR_REDIS_URL={urls['tool-executor']}\n",
    )
    return [*written, out / "redis" / "users.acl", store, env]


def render_helm(ids: Identities, redis_host: str, redis_port: int, edge_approvers: bool = False) -> Path:
    """Everything the chart takes from a mesh home, as one values file (0600, never committed):
    each principal's identity Secret (every service's with the deployment's data key), the keys of
    the tenants the gateways serve (``edgeTenants``; ``edge.tenants`` and ``a2a.tenants`` pick some), the trust
    bundle, the tenants rag indexes, the Redis ACL with its URLs, and the NATS auth include for the
    NATS chart (the dependency, under ``nats:``)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="agentmesh-helm-") as scratch:
        urls = render_redis(ids, redis_host, redis_port, Path(scratch))
        acl = (Path(scratch) / "redis" / "users.acl").read_text()
    identities: dict[str, dict[str, str]] = {}
    for service in SERVICES:
        files = {
            "nats.creds": ids.creds(service).read_text(),
            "signing-key.pem": ids.signing_key(service).read_text(),
        }
        if service in REDIS_SERVICES:
            files["redis-url"] = urls[service]
        if service == "tool-executor" and ids.audit_key.exists():
            files["audit.key"] = ids.audit_key.read_text()
        if ids.data_key.exists():  # wraps each tenant's data key (tenant content sealed at rest)
            files["data.key"] = ids.data_key.read_text()
        identities[service] = files
    identities["admin"] = {"nats.creds": ids.creds("admin").read_text()}
    identities["edge"] = {"nats.creds": edge_creds(ids)}  # it signs as the tenants, with their keys
    identities["a2a"] = {"nats.creds": edge_creds(ids, "a2a")}  # the A2A gateway, likewise
    identities["keeper"] = {"nats.creds": ids.creds("keeper").read_text(),
                            "signing-key.pem": ids.signing_key("keeper").read_text()}  # fmt: skip
    values = {
        "identities": identities,
        "trustBundle": ids.trust_bundle.read_text(),
        "edgeTenants": edge_tenant_keys(ids, approvers=edge_approvers),
        "config": {"MESH_TENANTS": ",".join(ids.tenants())},
        "redis": {"acl": acl},
        "nats": {"configMap": {"merge": {"data": {"auth.conf": auth_conf(ids)}}}},
    }
    out = ids.home / "helm" / "identity-values.yaml"
    # JSON is YAML, and quotes every multi-line secret exactly
    write_secret(out, json.dumps(values, indent=2) + "\n")
    return out


def _render(ids: Identities, args: argparse.Namespace) -> list[Path]:
    if args.what == "nats-auth":
        return render_nats_auth(ids)
    if args.what == "compose":
        return render_compose(ids)
    if args.what == "helm":
        return [render_helm(ids, args.redis_host, args.redis_port, args.edge_approvers)]
    if args.what in ("edge", "a2a"):
        tenants = [x.strip() for x in args.tenants.split(",") if x.strip()] or None
        return render_edge(ids, args.out.absolute(), tenants, args.approvers, gateway=args.what)
    render_redis(ids, args.host, args.port, args.out.absolute())
    return [args.out.absolute() / "redis" / "users.acl", args.out.absolute() / "secrets" / "redis"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="infra/render.py", description=__doc__.splitlines()[0])
    p.add_argument("--home", type=Path, default=Path(os.environ.get("MESH_HOME", ".mesh")))
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("nats-auth", help="NATS operator/resolver include for compose and the Helm chart")
    sub.add_parser("compose", help="everything docker-compose.yml reads from the mesh home")
    r = sub.add_parser("redis", help="Redis ACL + per-service URLs for a Redis you run (k8s)")
    r.add_argument("--host", required=True)
    r.add_argument("--port", type=int, default=REDIS_PORT)
    r.add_argument("--out", type=Path, required=True, help="directory for users.acl and the URLs")
    h = sub.add_parser("helm", help="the identity values for the Helm chart (infra/helm/agentmesh)")
    h.add_argument("--redis-host", default="redis", help="default: the chart's own Redis (Service redis)")
    h.add_argument("--redis-port", type=int, default=REDIS_PORT)
    approvers_help = (
        "also the keys of the tenants' people who approve from the browser (approver.<tenant>.<person>.pem)"
    )
    h.add_argument("--edge-approvers", action="store_true", help=approvers_help)
    for gateway, what in (("edge", "the edge's"), ("a2a", "the A2A gateway's")):
        e = sub.add_parser(gateway, help=f"{what} creds and tenant keys for its two Secrets (k8s)")
        e.add_argument("--out", type=Path, required=True,
                       help=f"directory for {gateway}/nats.creds and {gateway}/tenants/")  # fmt: skip
        e.add_argument("--tenants", default="", help="comma-separated (default: every tenant of the home)")
        e.add_argument("--approvers", action="store_true", help=approvers_help)
    args = p.parse_args(argv)

    ids = Identities(args.home.absolute())
    if not ids.exists():
        print(f"render: no identities in {ids.home} (run: meshctl init --tenants ...)", file=sys.stderr)
        return 2
    try:
        written = _render(ids, args)
    except ValueError as exc:  # one line naming what is missing from the home
        print(f"render: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
