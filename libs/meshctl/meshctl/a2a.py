"""``meshctl a2a``: the A2A gateway (``services/a2a``) on a local mesh, and tokens to call it.

    meshctl a2a start                                 # beside `meshctl up`; `meshctl down` stops it
    meshctl a2a url --tenant demo [--agent triage]    # an agent's card (without --agent: the tenant's agents)
    meshctl a2a token --tenant demo --user alice      # a caller's token (JWT) from the home's dev issuer

In production the gateway trusts the organisation's OIDC provider (``MESH_A2A_JWKS_URL``); here
the home's development issuer (the edge's, ``secrets/keys/edge-issuer.pem``) signs callers in,
for the gateway's own audience.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from meshctl import options as opt
from meshctl.commands.common import nats_url
from meshctl.edge import DEV_ISSUER, issuer_key, spawn_gateway, start_gateway, user_token
from meshctl.identity import Identities
from meshctl.local import MeshError, MeshState, Proc

AUDIENCE = "agentmesh-a2a"
NAME = "a2a"


def caller_token(ids: Identities, tenant: str, user: str, ttl_s: float = 3600.0) -> str:
    """A caller's token as an OIDC provider would issue it (the edge's, for the gateway's audience)."""
    return user_token(ids, tenant, user, ttl_s, audience=AUDIENCE)


def a2a_env(ids: Identities, url: str, port: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    issuer_key(ids)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({
        "MESH_NATS_URL": url, "MESH_CREDS_FILE": str(ids.creds(NAME)),
        "MESH_TRUST_BUNDLE_FILE": str(ids.trust_bundle), "MESH_A2A_KEYS_DIR": str(ids.secrets / "keys"),
        "MESH_A2A_PORT": str(port), "MESH_A2A_ISSUER": DEV_ISSUER, "MESH_A2A_AUDIENCE": AUDIENCE,
        "MESH_A2A_ISSUER_KEYS_FILE": str(ids.secrets / "keys" / "edge-issuer.pub.pem"), "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    })  # fmt: skip
    if ids.tls_ca.exists():
        env["MESH_TLS_CA_FILE"] = str(ids.tls_ca)
    return env


def spawn_a2a(ids: Identities, url: str, port: int, extra: dict[str, str] | None = None) -> Proc:
    """``python -m mesh_a2a`` on ``port`` with the home's identities (``extra``: more settings),
    once it is ready (stopped again if it never is)."""
    return spawn_gateway(ids, NAME, a2a_env(ids, url, port, extra), port)


def start(home: Path, url: str, port: int = 0) -> int:
    """Start the gateway beside the local mesh of ``home``; returns its port."""
    return start_gateway(home, NAME, lambda ids, p: spawn_a2a(ids, url, p), port)


def cmd_a2a(args: argparse.Namespace) -> int:
    home = opt.home(args)
    if args.action == "start":
        port = start(home, nats_url(args, home), args.port)
        print(f"a2a gateway on http://127.0.0.1:{port}/ (meshctl a2a url --tenant <t> names an agent's card)")
        return 0
    ids = Identities(home)
    if args.action == "token":
        print(caller_token(ids, args.tenant, args.user, args.ttl))
        return 0
    state = MeshState.load(home)
    running = state.services.get(NAME) if state else None
    if running is None or not running.alive():
        raise MeshError("the a2a gateway is not running (meshctl a2a start)")
    base = f"http://127.0.0.1:{running.http_port}/a2a/{args.tenant}"
    print(f"{base}/{args.agent}/.well-known/agent-card.json" if args.agent else base)
    return 0


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    s = sub.add_parser("a2a", help="the A2A gateway: a tenant's agents for other agents (start it, its URLs, tokens)")
    asub = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)
    a = asub.add_parser("start", help="start the A2A gateway beside `meshctl up`")
    a.add_argument("--port", type=opt.port, default=0, help="port (default: a free one)")
    a.add_argument("--nats-url", default=None)
    u = asub.add_parser("url", help="an agent's card URL (no --agent: the URL listing the tenant's agents)")
    u.add_argument("--tenant", type=opt.tenant, required=True)
    u.add_argument("--agent", default="", help="mesh (the planner) or one of the tenant's workflows")
    t = asub.add_parser("token", help="print a caller's token (JWT) from the home's development issuer")
    t.add_argument("--tenant", type=opt.tenant, required=True)
    t.add_argument("--user", required=True, help="the person (the token's sub)")
    t.add_argument("--ttl", type=opt.positive, default=3600.0, help="seconds the token is valid (default 3600)")
    s.set_defaults(fn=cmd_a2a)
