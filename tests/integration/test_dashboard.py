"""``meshctl dashboard``'s server against a real nats-server: only an operator's signed
statement gets in, the page is served with a strict policy, and the frame it serves is live.

The page itself is rendered by a real headless Chromium in ``make dashboard-check``."""

from __future__ import annotations

import asyncio
import time

import httpx
import nats
import pytest

from mesh_identity import Signer, TrustBundle, Verifier
from mesh_kit.settings import nats_servers
from meshctl.dashboard import COOKIE, MAX_BODY, Dashboard, sign_in

pytestmark = pytest.mark.integration


@pytest.fixture
async def board(integration_infra):
    infra = integration_infra

    async def connect():
        return await nats.connect(nats_servers(infra.nats_url), **infra.ids.connect_options("admin"))

    d = Dashboard(connect, Verifier(TrustBundle.from_file(infra.ids.trust_bundle)), interval_s=0.3)
    await d.start()
    try:
        yield d
    finally:
        await d.stop()


def _signer(infra, principal: str) -> Signer:
    return Signer.from_file(principal, infra.ids.signing_key(principal))


async def test_only_an_operators_statement_gets_in(integration_infra, board):
    url = f"http://127.0.0.1:{board.port}"
    admin = _signer(integration_infra, "admin")
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        for path in ("/", "/app.js", "/api/frame", "/api/task?tenant=acme&task=t1"):
            assert (await http.get(path)).status_code == 401, path
        bad = {
            "another principal's": sign_in(_signer(integration_infra, "worker")),
            "expired": admin.statement("dashboard", {"use": "dashboard"}, now=time.time() - 7200, ttl_s=3600),
            "another kind of": admin.statement("redrive", {"use": "dashboard"}),
            "garbage": "not.a.token",
        }
        for what, token in bad.items():
            r = await http.get("/api/frame", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, f"{what} statement let in"
            assert (await http.get(f"/?token={token}")).status_code == 401, f"{what} statement signed in"

        signed_in = await http.get(f"/?token={sign_in(admin)}")
        assert signed_in.status_code == 302 and signed_in.headers["location"] == "/"
        cookie = signed_in.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        page = await http.get("/")  # the client keeps the cookie
        assert page.status_code == 200 and "<title>AgentMesh</title>" in page.text
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert page.headers["cache-control"] == "no-store"
        assert (await http.get("/app.js")).headers["content-type"].startswith("application/javascript")
        assert (await http.post("/api/frame")).status_code == 405, "read-only"
        assert (await http.get("/api/task?tenant=acme&task=../x")).status_code == 400
        missing = await http.get("/api/task?tenant=acme&task=no-such-task")
        assert missing.status_code == 404 and "no stored message" in missing.json()["error"]
    assert board.denied >= 12


async def test_the_frame_is_live(integration_infra, board):
    token = sign_in(_signer(integration_infra, "admin"))
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{board.port}", headers={"Authorization": f"Bearer {token}"}, timeout=5
    ) as http:
        first = (await http.get("/api/frame")).json()
        assert {"tenants", "services", "durables", "models", "trips", "dlq", "age_s"} <= set(first)
        assert "worker" in first["services"] and "planner" in first["services"]
        await asyncio.sleep(1.0)
        later = (await http.get("/api/frame")).json()
    assert later["at"] > first["at"] and board.frames >= 3, "a new frame every interval"


async def test_reviewing_from_the_page_is_one_guarded_post_and_only_for_the_reviewers_tenant(integration_infra, board):
    """``--as approver.<tenant>.<person>``: ``POST /api/review`` is the dashboard's only write. Without
    a reviewer it is refused; with one: only a signed-in session, only JSON from the page's own
    origin, a small body, the reviewer's own tenant, approve or reject; then the decision is what
    ``meshctl review`` does (here: nothing of that task waits, said as the CLI says it). The whole
    path, clicked in Chromium against a running mesh: ``make dashboard-check``."""
    from types import SimpleNamespace

    token = sign_in(_signer(integration_infra, "admin"))
    url, auth = f"http://127.0.0.1:{board.port}", {"Authorization": f"Bearer {token}"}
    ok = {"tenant": "acme", "task": "t-none", "decision": "approve", "comment": "fine"}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        r = await http.post("/api/review", json=ok, headers=auth)
        assert r.status_code == 403 and "read-only: start it with --as" in r.json()["error"]
        board.reviewer = SimpleNamespace(name="approver.acme.dana", tenant="acme")  # never asked to sign here
        assert (await http.post("/api/review", json=ok)).status_code == 401, "not signed in"
        r = await http.post("/api/review", content=b"tenant=acme", headers={**auth, "Content-Type": "text/plain"})
        assert r.status_code == 415, "a cross-site form cannot send JSON"
        r = await http.post("/api/review", json=ok, headers={**auth, "Origin": "http://evil.example"})
        assert r.status_code == 403 and "not from http://evil.example" in r.json()["error"]
        r = await http.post("/api/review", json={**ok, "comment": "x" * (MAX_BODY + 1)}, headers=auth)
        assert r.status_code == 413
        r = await http.post("/api/review", json={**ok, "tenant": "globex"}, headers=auth)
        assert r.status_code == 403 and "reviews for acme only" in r.json()["error"]
        r = await http.post("/api/review", json={**ok, "decision": "edit"}, headers=auth)
        assert r.status_code == 400
        r = await http.post("/api/review", json=ok, headers={**auth, "Origin": url})
        assert r.status_code == 409 and "has no draft plan" in r.json()["error"], r.text
        assert (await http.put("/api/review", json=ok, headers=auth)).status_code == 405
