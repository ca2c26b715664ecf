"""`meshctl up`, `status`, `down` as a user runs them (subprocesses, local binaries)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from meshctl.supervisor import MAX_RESTARTS

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


def still_alive(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Those of ``pids`` still running after ``timeout`` (a process SIGKILLed a moment ago may
    still be on its way out)."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_up_status_down_manages_exactly_what_it_started(tmp_path):
    home = tmp_path / "mesh"
    up = meshctl(home, "up", "--tenants", "acme", "--nats-port", "0", "--http-port", "0", "--redis-port", "0")
    assert up.returncode == 0, up.stderr
    assert (
        "6 service processes (planner, worker, checker, rag, tool-executor, budget)" in up.stdout
        and "supervisor: pid" in up.stdout
    )
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
        # ...and says what failed and what to try, the task's history last (meshctl.explain).
        said = uncited.stderr.strip().splitlines()
        assert said[-3].startswith("  what failed: citations_present (the task retrieved 0 passage(s)"), said
        assert "nothing was retrieved" in said[-2] and "meshctl ingest PATH --tenant acme" in said[-2], said
        assert said[-1].startswith("  see: meshctl history ") and said[-1].endswith("each check and why"), said
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
        pids = [p["pid"] for p in (*state["services"].values(), *state["nats"], state["redis"], state["supervisor"])]
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
        assert "impostor" not in down.stdout and "supervisor" in down.stdout
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
    # Unsupervised: a supervisor would start the killed node again at once, and this is about the
    # cluster serving while a node is down (and `up --no-supervise` still working).
    home = tmp_path / "cluster"
    up = meshctl(home, "up", "--cluster", "3", "--tenants", "acme", "--nats-port", "0", "--http-port", "0",
                 "--redis-port", "0", "--no-supervise")  # fmt: skip
    assert up.returncode == 0, up.stderr
    try:
        state = json.loads((home / "run" / "state.json").read_text())
        assert state["supervisor"] is None and "supervisor" not in up.stdout
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
    assert not still_alive([p["pid"] for p in (*state["services"].values(), *nodes, state["redis"])])


# The supervisor (`meshctl up` without --no-supervise): what exits is started again as itself.

UP = ("up", "--tenants", "acme", "--nats-port", "0", "--http-port", "0", "--redis-port", "0")


def mesh_state(home: Path) -> dict[str, Any]:
    state: dict[str, Any] = json.loads((home / "run" / "state.json").read_text())
    return state


def procs(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every process of the mesh, by name (nats-server and redis-server too)."""
    return {p["name"]: p for p in (*state["services"].values(), *state["nats"], state["redis"], state["supervisor"])}


def http_ok(port: int, path: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:  # refused while it starts, or an HTTP error status (URLError, HTTPError)
        return False


def tcp_ok(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def until(check: Callable[[], Any], what: str, timeout: float = 90.0) -> Any:
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    pytest.fail(f"{what}: not within {timeout:.0f} s")


def kill_and_wait_back(home: Path, name: str, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """kill -9 ``name``; wait until the state names a new pid for it and ``ready`` says it serves.
    Prints the time from the kill to ready (run with -s to see it)."""
    old = procs(mesh_state(home))[name]
    t0 = time.monotonic()
    os.kill(old["pid"], signal.SIGKILL)

    def back() -> dict[str, Any] | None:
        new = procs(mesh_state(home))[name]
        return new if new["pid"] != old["pid"] and ready(new) else None

    new: dict[str, Any] = until(back, f"{name} started again after kill -9")
    print(f"\n{name}: kill -9 -> ready again (new pid {new['pid']}) in {time.monotonic() - t0:.2f} s")
    assert new["restarts"] == old["restarts"] + 1 and "killed by SIGKILL" in new["last_exit"]
    for key in ("port", "http_port", "argv", "log"):
        assert new[key] == old[key], f"{name} is started again as itself: same {key}"
    return new


def completes(home: Path) -> None:
    """A task still goes end to end: every service it crosses works."""
    done = meshctl(home, "submit", "How are identity tokens checked? Also compute 2 + 2.", "--tenant", "acme",
                   "--follow", "--json", "--timeout", "60")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["outcome"]["type"] == "task.completed"


def all_ready(home: Path) -> dict[str, Any] | None:
    status = meshctl(home, "status", "--json")
    return json.loads(status.stdout) if status.returncode == 0 else None


def test_a_service_killed_is_started_again_as_itself(tmp_path):
    home = tmp_path / "mesh"
    up = meshctl(home, *UP)
    assert up.returncode == 0, up.stderr
    started = list(procs(mesh_state(home)).values())
    try:
        old = procs(mesh_state(home))["worker"]
        new = kill_and_wait_back(home, "worker", lambda p: http_ok(p["http_port"], "/readyz"))
        report = until(lambda: all_ready(home), "status of a whole mesh again")
        worker = report["processes"]["worker"]
        assert worker["restarts"] == 1 and worker["last_exit"] == "killed by SIGKILL" and worker["state"] == "running"
        assert report["services"]["worker"]["ready"] and report["processes"]["planner"]["restarts"] == 0
        log = (home / "logs" / "supervisor.log").read_text()
        assert f"worker (pid {old['pid']}) killed by SIGKILL while serving; restarting it now" in log
        assert f"worker started again as pid {new['pid']} (restart 1)" in log
        row = next(line.split() for line in meshctl(home, "status").stdout.splitlines() if line.startswith("worker "))
        assert row[:4] == ["worker", str(new["pid"]), "yes", "1"], row
        completes(home)
    finally:
        down = meshctl(home, "down")
    assert down.returncode == 0 and "supervisor" in down.stdout, down.stdout + down.stderr
    assert not still_alive([p["pid"] for p in started] + [new["pid"]]), "down leaves nothing running"
    assert not (home / "run" / "state.json").exists()


def test_replicas_share_the_work_and_a_killed_one_comes_back_as_itself(tmp_path):
    """``--replicas worker=2``: two worker processes on one identity and one set of consumers.
    With the first frozen, a task completes on the second; the second killed comes back as
    itself (a worker, under its own name, port and log)."""
    home = tmp_path / "mesh"
    up = meshctl(home, *UP, "--replicas", "worker=2")
    assert up.returncode == 0, up.stderr
    assert "worker, worker-2" in up.stdout, up.stdout
    state = mesh_state(home)
    pids = [p["pid"] for p in procs(state).values()]
    assert [state["services"][n]["service"] for n in ("worker", "worker-2", "planner")] == [
        "worker",
        "worker",
        "planner",
    ]
    try:
        report = until(lambda: all_ready(home), "status of the whole mesh")
        assert report["services"]["worker-2"]["ready"] and report["processes"]["worker-2"]["restarts"] == 0
        first = state["services"]["worker"]["pid"]
        os.kill(first, signal.SIGSTOP)  # frozen: what it holds goes to the other after ack_wait
        try:
            completes(home)
        finally:
            os.kill(first, signal.SIGCONT)
        new = kill_and_wait_back(home, "worker-2", lambda p: http_ok(p["http_port"], "/readyz"))
        pids.append(new["pid"])
        assert new["service"] == "worker" and mesh_state(home)["services"]["worker"]["pid"] == first
        log = (home / "logs" / "supervisor.log").read_text()
        assert f"worker-2 started again as pid {new['pid']} (restart 1)" in log
        completes(home)
    finally:
        down = meshctl(home, "down")
    assert down.returncode == 0 and "worker-2" in down.stdout, down.stdout + down.stderr
    assert not still_alive(pids), "down leaves nothing running"


def standing_by(home: Path) -> dict[str, int]:
    """Service -> pid of its latest warm standby, as the supervisor's log announces them."""
    log = (home / "logs" / "supervisor.log").read_text()
    out = {}
    for line in log.splitlines():
        if " standing by (pid " in line:
            head, _, pid = line.rpartition(" standing by (pid ")
            out[head.rsplit(" ", 1)[-1]] = int(pid.rstrip(")"))
    return out


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state [0], parent pid [1] ([] once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return []


def test_with_standby_a_killed_service_is_replaced_by_a_copy_of_its_warm_standby(tmp_path):
    """``--standby``: every service has a warm standby (imported, not connected). A worker killed
    -9 is replaced by a copy the standby forks (on the old port and log, a child of the
    supervisor, which reaps it); the standby stays and serves the next restart too; tasks
    complete. A standby whose supervisor is gone exits by itself, and ``down`` leaves nothing
    running."""
    home = tmp_path / "mesh"
    up = meshctl(home, *UP, "--standby")
    assert up.returncode == 0, up.stderr
    pids = [p["pid"] for p in procs(mesh_state(home)).values()]
    services = ("planner", "worker", "checker", "rag", "tool-executor", "budget")
    try:
        spares = until(lambda: (s := standing_by(home)) and set(s) == set(services) and s, "a standby per service")
        pids += list(spares.values())
        boss = mesh_state(home)["supervisor"]
        old = procs(mesh_state(home))["worker"]
        for restart in (1, 2):  # the same standby serves both
            t0 = time.monotonic()
            os.kill(old["pid"], signal.SIGKILL)

            def back(old: dict[str, Any] = old) -> dict[str, Any] | None:
                new = procs(mesh_state(home))["worker"]
                return new if new["pid"] != old["pid"] and http_ok(new["http_port"], "/readyz") else None

            new = until(back, "worker replaced after kill -9")
            pids.append(new["pid"])
            print(f"\nworker: kill -9 -> ready again (pid {new['pid']}) in {time.monotonic() - t0:.2f} s")
            assert new["pid"] != spares["worker"] and _stat(spares["worker"]), "the standby stands by still"
            assert int(_stat(new["pid"])[1]) == boss["pid"], "the copy is the supervisor's child (adopted)"
            assert (new["http_port"], new["log"], new["service"]) == (old["http_port"], old["log"], "worker")
            assert "--standby" in new["argv"] and new["restarts"] == restart
            log = (home / "logs" / "supervisor.log").read_text()
            assert f"worker started again as pid {new['pid']} (restart {restart}, its warm standby)" in log
            assert " worker ready" in Path(new["log"]).read_text(), "it writes to the worker's log"
            until(lambda o=old: not _stat(o["pid"]), "the killed worker reaped, not a zombie")
            old = new
        assert standing_by(home) == spares, "no standby was used up"
        completes(home)

        os.kill(boss["pid"], signal.SIGKILL)
        assert not still_alive(list(spares.values())), "standbys exit when their supervisor is gone (end of input)"
    finally:
        down = meshctl(home, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not still_alive(pids), "down leaves nothing running"


def test_a_bad_replica_count_is_one_line_and_starts_nothing(tmp_path):
    home = tmp_path / "mesh"
    for arg, why in (("worker=0", "a replica count is 1-16, got '0'"), ("wrker=2", "unknown service 'wrker'"),
                     ("99", "a replica count is 1-16, got '99'")):  # fmt: skip
        bad = meshctl(home, *UP, "--replicas", arg)
        assert bad.returncode == 2 and why in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    bad = meshctl(home, *UP, "--standby", "--no-supervise")
    assert bad.returncode == 2 and "--standby needs the supervisor" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert not (home / "run" / "state.json").exists()


def test_nats_and_redis_killed_come_back_on_their_ports(tmp_path):
    home = tmp_path / "mesh"
    up = meshctl(home, *UP)
    assert up.returncode == 0, up.stderr
    state = mesh_state(home)
    pids = [p["pid"] for p in procs(state).values()]
    try:
        nats = kill_and_wait_back(
            home, "nats-server", lambda p: http_ok(p["http_port"], "/healthz?js-enabled-only=true")
        )
        redis = kill_and_wait_back(home, "redis-server", lambda p: tcp_ok(p["port"]))
        pids += [nats["pid"], redis["pid"]]
        report = until(lambda: all_ready(home), "every service ready again, reconnected")
        assert (
            report["processes"]["nats-server"]["restarts"] == 1 and report["processes"]["redis-server"]["restarts"] == 1
        )
        completes(home)  # the stream store survived; Redis's users are the same

        # The supervisor itself killed: what it started runs on (its own sessions), nothing is
        # restarted any more, and `down` still stops all of it.
        boss = mesh_state(home)["supervisor"]
        os.kill(boss["pid"], signal.SIGKILL)
        assert still_alive([boss["pid"]]) == []
        status = meshctl(home, "status")
        assert "not running: nothing is restarted" in status.stdout, status.stdout
        assert [p for p in procs(mesh_state(home)).values() if p["name"] != "supervisor" and not alive(p["pid"])] == []
    finally:
        down = meshctl(home, "down")
    assert down.returncode == 0 and "nats-server" in down.stdout and "planner" in down.stdout, down.stdout
    assert not still_alive(pids), "down leaves nothing running"


def test_a_crash_looping_service_is_left_down_and_the_rest_runs_on(tmp_path):
    home = tmp_path / "mesh"
    up = meshctl(home, *UP)
    assert up.returncode == 0, up.stderr
    pids = [p["pid"] for p in procs(mesh_state(home)).values()]
    try:
        # A real failure on every start: the checker's signing key, read at start-up, is damaged.
        (home / "secrets" / "keys" / "checker.pem").write_text("not a key\n")
        os.kill(procs(mesh_state(home))["checker"]["pid"], signal.SIGKILL)

        def given_up() -> dict[str, Any] | None:
            checker = procs(mesh_state(home))["checker"]
            return checker if checker["state"] == "crash-looping" else None

        checker = until(given_up, "the checker marked crash-looping", timeout=150)
        # The kill of the serving checker is not its own failure (restarted, not counted); the
        # MAX_RESTARTS starts after it that failed by themselves are.
        assert checker["restarts"] == MAX_RESTARTS + 1 and checker["last_exit"].startswith("exited 1: ")
        assert not alive(checker["pid"])
        log = (home / "logs" / "supervisor.log").read_text()
        assert "checker (pid" in log and "restarts in 60 s: not starting it again (crash-looping" in log
        time.sleep(2)  # no restart after that: the same dead pid, the same count
        assert procs(mesh_state(home))["checker"] == checker
        status = meshctl(home, "status", "--json")
        report = json.loads(status.stdout)
        assert status.returncode == 1 and report["services"]["checker"]["ready"] is False
        assert report["services"]["checker"]["reason"].startswith("crash-looping, not restarted any more")
        others = {k: v for k, v in report["services"].items() if k != "checker"}
        assert len(others) == 5 and all(v["ready"] for v in others.values()), others
        assert all(p["alive"] for name, p in report["processes"].items() if name != "checker")
        assert "crash-looping" in meshctl(home, "status").stdout
    finally:
        down = meshctl(home, "down")
    assert down.returncode == 0 and "supervisor" in down.stdout and "checker" not in down.stdout, down.stdout
    assert not still_alive(pids), "down leaves nothing running"
