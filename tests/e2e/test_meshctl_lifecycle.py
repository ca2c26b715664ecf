"""`meshctl up`, `status`, `down` as a user runs them (subprocesses, local binaries)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def meshctl(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshctl", "--home", str(home), *args], capture_output=True, text=True, timeout=timeout
    )


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except FileNotFoundError:
        return False
    return stat[0] != "Z"


def test_up_status_down_manages_exactly_what_it_started(tmp_path):
    home = tmp_path / "mesh"
    up = meshctl(home, "up", "--tenants", "acme", "--nats-port", "0", "--http-port", "0", "--redis-port", "0")
    assert up.returncode == 0, up.stderr
    assert "6 services" in up.stdout
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        status = meshctl(home, "status", "--json")
        assert status.returncode == 0, status.stdout + status.stderr
        report = json.loads(status.stdout)
        assert all(s["ready"] for s in report["services"].values()) and len(report["services"]) == 6
        assert all(c["pending"] == 0 for c in report["consumers"].values())

        missing = meshctl(home, "dlq", "retry", "999")
        assert missing.returncode == 2 and "no dead letter with sequence 999" in missing.stderr
        listing = meshctl(home, "dlq", "list")
        assert listing.returncode == 0 and "dead letter(s) in total" in listing.stdout

        again = meshctl(home, "up", "--nats-port", "0", "--http-port", "0", "--redis-port", "0")
        assert again.returncode == 2 and "already running" in again.stderr

        done = meshctl(
            home,
            "submit",
            "How are identity tokens checked? Also compute 2 + 2.",
            "--tenant",
            "acme",
            "--follow",
            "--json",
            "--timeout",
            "30",
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["outcome"]["type"] == "task.completed"
        # Nothing in the documents is about this, and the answer needs none: it completes.
        arithmetic = meshctl(home, "submit", "What is 2 + 2?", "--tenant", "acme", "--follow", "--timeout", "30")
        assert arithmetic.returncode == 0 and "The result is 4." in arithmetic.stdout, arithmetic.stderr
        # A policy that demands citations: the checker fails the same answer, with the reason, exit 1.
        uncited = meshctl(home, "submit", "What is 2 + 2?", "--tenant", "acme", "--follow", "--timeout", "30",
                          "--policy", '{"require_citations": true}')  # fmt: skip
        assert uncited.returncode == 1
        assert "checker rejected the answer: citations_present: the task retrieved 0 passage(s)" in uncited.stderr
        # Per tenant: tasks in flight (none now: all three ended), running as the budget sees them,
        # idle (waiting for the world, holding no run slot), queued (none), the queue time of
        # those, admitted and refused.
        tenants = meshctl(home, "status")
        row = next(line for line in tenants.stdout.splitlines() if line.startswith("acme "))
        assert row.split()[1:8] == ["0", "0", "0", "0", "0.0", "3", "0"], tenants.stdout
        report = json.loads(meshctl(home, "status", "--json").stdout)
        assert report["tenants"]["acme"]["admitted"] == 3 and report["tenants"]["acme"]["in_flight"] == {}
        # What acme holds of its quota in TASK (of an eighth of the 512 MiB cap): its three
        # submissions, and what the planner stored about them that it has counted so far.
        quota = next(line.split() for line in tenants.stdout.splitlines() if line.split()[:2] == ["acme", "TASK"])
        assert quota[4:6] == ["64.0", "MiB"] and int(quota[6]) >= 3, tenants.stdout
        held = next(q for q in report["quotas"] if (q["tenant"], q["stream"]) == ("acme", "TASK"))
        assert held["msgs"] >= 3 and 1000 < held["bytes"] < 100_000 and held["limit_bytes"] == 64 << 20

        # A recycled pid: the state file names the bystander's pid, but with another start time.
        state_file = home / "run" / "state.json"
        state = json.loads(state_file.read_text())
        pids = [p["pid"] for p in (*state["services"].values(), *state["nats"], state["redis"])]
        state["services"]["impostor"] = {
            "name": "impostor",
            "pid": bystander.pid,
            "argv": ["sleep"],
            "log": str(home / "x.log"),
            "started": 1,
        }
        state_file.write_text(json.dumps(state))

        down = meshctl(home, "down")
        assert down.returncode == 0, down.stderr
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)], "every process up started is gone"
        assert bystander.poll() is None, "a process up did not start is never signalled"
        assert "impostor" not in down.stdout
        after = meshctl(home, "status")
        assert after.returncode == 2 and "no mesh is running" in after.stderr
    finally:
        bystander.kill()
        bystander.wait()
        meshctl(home, "down")
    assert not any(os.access(p, os.F_OK) for p in [home / "run" / "state.json"])


def stream_leader(http_port: int, stream: str) -> str:
    """The node leading ``stream``, from a node's monitoring endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/jsz?accounts=true&streams=true", timeout=5) as r:
        jsz = json.load(r)
    return next(
        s["cluster"]["leader"]
        for a in jsz.get("account_details", [])
        for s in a.get("stream_detail", [])
        if s["name"] == stream
    )


def test_a_three_node_cluster_keeps_serving_with_a_node_down(tmp_path):
    home = tmp_path / "cluster"
    up = meshctl(home, "up", "--cluster", "3", "--tenants", "acme", "--nats-port", "0", "--http-port", "0",
                 "--redis-port", "0")  # fmt: skip
    assert up.returncode == 0, up.stderr
    try:
        state = json.loads((home / "run" / "state.json").read_text())
        nodes = state["nats"]
        assert [n["name"] for n in nodes] == ["agentmesh-0", "agentmesh-1", "agentmesh-2"]
        assert state["nats_url"].count("nats://") == 3, "clients are given every node"
        goal = "How does AgentMesh avoid duplicate side effects? Also compute 17 * 23."
        first = meshctl(home, "submit", goal, "--tenant", "acme", "--follow", "--json", "--timeout", "30")
        assert first.returncode == 0, first.stderr
        # Kill the node leading the TASK stream (a node `up` started: pid from its own state
        # file) and submit at once: the publish meets the leader election and must ride it out.
        victim = next(n for n in nodes if n["name"] == stream_leader(nodes[0]["http_port"], "TASK"))
        os.kill(victim["pid"], 9)
        during = meshctl(home, "submit", goal, "--tenant", "acme", "--follow", "--json", "--timeout", "60")
        assert during.returncode == 0, during.stderr
        assert json.loads(during.stdout)["outcome"]["type"] == "task.completed"
        deadline = time.monotonic() + 30
        while (status := meshctl(home, "status")).returncode != 0:  # services reconnect to live nodes
            assert status.returncode == 1 and "Traceback" not in status.stderr, status.stderr
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.5)
        victim_line = status.stdout.split(victim["name"])[1].splitlines()[0]
        assert "NO" in victim_line, status.stdout
        again = meshctl(home, "submit", goal, "--tenant", "acme", "--follow", "--json", "--timeout", "60")
        assert again.returncode == 0, again.stderr
        outcome = json.loads(again.stdout)["outcome"]
        assert outcome["type"] == "task.completed" and "391" in outcome["answer"]
    finally:
        down = meshctl(home, "down")
    survivors = [n["name"] for n in nodes if n is not victim]
    assert down.returncode == 0 and all(name in down.stdout for name in survivors), down.stdout
