"""``meshctl edge``: the HTTP gateway (``services/edge``) on a local mesh, and the development
identity provider that signs its users in.

    meshctl edge start                             # beside `meshctl up`; `meshctl down` stops it
    meshctl edge token --tenant demo --user alice  # a user token (JWT) from the home's dev issuer
    meshctl edge url --tenant demo --user alice    # the example web app, signed in

In production the edge trusts the organisation's OIDC provider (``MESH_EDGE_JWKS_URL``); here the
home holds a development issuer key (``secrets/keys/edge-issuer.pem``) so a person can be signed
in without one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshctl import options as opt
from meshctl.commands.common import nats_url
from meshctl.identity import Identities, write_secret
from meshctl.local import MeshError, MeshState, Proc, free_port, spawn, stop, wait_ready

DEV_ISSUER = "agentmesh-dev"
AUDIENCE = "agentmesh-edge"
WEB_APP = Path(__file__).resolve().parents[3] / "examples" / "web"
"""The example web app, served at ``/`` by a local edge (in a source checkout)."""


def issuer_key(ids: Identities) -> Ed25519PrivateKey:
    """The home's development issuer key (made on first use), its public half beside it."""
    path = ids.secrets / "keys" / "edge-issuer.pem"
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
        write_secret(path, pem)
        public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)  # fmt: skip
        path.with_name("edge-issuer.pub.pem").write_bytes(public)
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, Ed25519PrivateKey)
    return loaded


def user_token(ids: Identities, tenant: str, user: str, ttl_s: float = 3600.0, audience: str = AUDIENCE) -> str:
    """A user token as an OIDC provider would issue it: ``sub`` the person, ``tenant`` theirs, for
    ``audience`` (the edge's, or another gateway's signing people in the same way)."""
    now = int(time.time())
    claims = {"iss": DEV_ISSUER, "aud": audience, "sub": user, "tenant": tenant, "iat": now, "exp": now + int(ttl_s)}
    return jwt.encode(claims, issuer_key(ids), algorithm="EdDSA")


def edge_env(ids: Identities, url: str, port: int, static: Path | None) -> dict[str, str]:
    issuer_key(ids)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({
        "MESH_NATS_URL": url, "MESH_CREDS_FILE": str(ids.creds("edge")),
        "MESH_TRUST_BUNDLE_FILE": str(ids.trust_bundle), "MESH_EDGE_KEYS_DIR": str(ids.secrets / "keys"),
        "MESH_EDGE_PORT": str(port), "MESH_EDGE_ISSUER": DEV_ISSUER, "MESH_EDGE_AUDIENCE": AUDIENCE,
        "MESH_EDGE_ISSUER_KEYS_FILE": str(ids.secrets / "keys" / "edge-issuer.pub.pem"), "PYTHONUNBUFFERED": "1",
    })  # fmt: skip
    if ids.tls_ca.exists():
        env["MESH_TLS_CA_FILE"] = str(ids.tls_ca)
    if static is not None:
        env["MESH_EDGE_STATIC_DIR"] = str(static)
    return env


def spawn_gateway(ids: Identities, name: str, env: dict[str, str], port: int) -> Proc:
    """``python -m mesh_<name>`` (a gateway: the edge, a2a) on ``port`` with ``env``, once it is
    ready (stopped again if it never is)."""
    proc = spawn(name, [sys.executable, "-m", f"mesh_{name}"], ids.home / "logs" / f"{name}.log", env, http_port=port)
    proc.service = name
    try:
        asyncio.run(wait_ready({name: proc}, 30.0))
    except BaseException:
        stop([[proc]], 10.0)
        raise
    return proc


def spawn_edge(ids: Identities, url: str, port: int, static: Path | None = None) -> Proc:
    """``python -m mesh_edge`` on ``port`` with the home's identities, once it is ready."""
    return spawn_gateway(ids, "edge", edge_env(ids, url, port, static), port)


def start_gateway(home: Path, name: str, spawn_it: Callable[[Identities, int], Proc], port: int = 0) -> int:
    """Start gateway ``name`` beside the local mesh of ``home`` (``spawn_it(ids, port)``; recorded
    with its services, so ``meshctl down`` stops it); returns its port (a running one's if up)."""
    ids = Identities(home)
    state = MeshState.load(home)
    if state is None:
        raise MeshError(f"no mesh runs from {home} (meshctl up first)")
    if not ids.creds(name).exists():
        raise MeshError(f"{home} has no {name} identity (a home minted before the {name}: meshctl init --force)")
    old = state.services.get(name)
    if old is not None and old.alive():
        return old.http_port
    state.services[name] = proc = spawn_it(ids, port or free_port())
    state.save()
    return proc.http_port


def start(home: Path, url: str, port: int = 0, static: Path | None = WEB_APP) -> int:
    """Start the edge beside the local mesh of ``home``; returns its port."""
    static = static if static is not None and static.is_dir() else None
    return start_gateway(home, "edge", lambda ids, p: spawn_edge(ids, url, p, static), port)


def cmd_edge(args: argparse.Namespace) -> int:
    home = opt.home(args)
    ids = Identities(home)
    if args.action == "start":
        port = start(home, nats_url(args, home), args.port)
        print(f"edge on http://127.0.0.1:{port}/ (meshctl edge url --tenant <t> --user <name> signs a person in)")
        return 0
    state = MeshState.load(home)
    edge = state.services.get("edge") if state else None
    token = user_token(ids, args.tenant, args.user, args.ttl)
    if args.action == "token":
        print(token)
    elif edge is None:
        raise MeshError("the edge is not running (meshctl edge start)")
    else:
        print(f"http://127.0.0.1:{edge.http_port}/#token={token}")
    return 0


def register(sub: argparse._SubParsersAction[opt.Parser]) -> None:
    s = sub.add_parser("edge", help="the HTTP gateway for browsers: start it, sign a person in")
    esub = s.add_subparsers(dest="action", required=True, parser_class=opt.Parser)
    a = esub.add_parser("start", help="start the edge beside `meshctl up` (serves the example web app at /)")
    a.add_argument("--port", type=opt.port, default=0, help="port (default: a free one)")
    a.add_argument("--nats-url", default=None)
    for action, why in (("token", "print a user token (JWT) from the home's development issuer"),
                        ("url", "print the example web app's URL, signed in as the user")):  # fmt: skip
        a = esub.add_parser(action, help=why)
        a.add_argument("--tenant", type=opt.tenant, required=True)
        a.add_argument("--user", required=True, help="the person (the token's sub)")
        a.add_argument("--ttl", type=opt.positive, default=3600.0, help="seconds the token is valid (default 3600)")
    s.set_defaults(fn=cmd_edge)
