"""meshctl: a bad argument or an impossible request is one clear line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshctl import budget as spend
from meshctl.commands.operate import render_switches

pytestmark = pytest.mark.unit


def meshctl(*args: str, home: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshctl", "--home", home, *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "--tenant", "a.b", "x"], "invalid tenant 'a.b'"),
        (["submit"], "a goal is needed (or --workflow NAME, whose nodes say what to do)"),
        (["submit", "x", "--input", "a=1"], "--input is for a workflow's inputs: name the workflow with --workflow"),
        (["submit", "--workflow", "refund@v2"], "expected NAME, NAME@latest or NAME@<16 hex digits>"),
        (["submit", "x", "--timeout", "-3"], "must be > 0"),
        (["up", "--nats-port", "99999"], "not a port number: '99999'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["status"], "no mesh is running from"),
        (["submit", "hi", "--tenant", "zzz"], "unknown tenant 'zzz'"),
        (["dlq", "show", "x"], "invalid int value: 'x'"),
        (["budget", "--task", "t1"], "--task needs --tenant"),
        (["budget", "--day", "20241301"], "not a day: '20241301' (use YYYYMMDD"),
        (["budget", "--day", "yesterday"], "not a day: 'yesterday'"),
        (["budget", "--tenant", "a.b"], "invalid tenant 'a.b'"),
        (["budget", "--tenant", "acme"], "no identities in"),
        (["kill-switch", "on"], "'on' needs --reason"),
        (["kill-switch", "on", "--reason", "  "], "'on' needs --reason"),
        (["kill-switch", "status", "--reason", "x"], "--reason is for 'on' (required) and 'off' (optional), not"),
        (["kill-switch", "off", "--reason", "incident closed"], "no identities in"),  # accepted: its reason is audited
        (["kill-switch", "pause"], "invalid choice: 'pause'"),
        (["kill-switch", "on", "--tenant", "zzz", "--reason", "x"], "unknown tenant 'zzz'"),
        (["kill-switch", "status"], "no identities in"),
        (["halt", "a.b"], "invalid task id 'a.b'"),
        (["cancel"], "the following arguments are required: TASK_ID"),
        (["resume", "t1", "--timeout", "0"], "must be > 0"),
        (["halt", "t1", "--tenant", "zzz"], "unknown tenant 'zzz'"),
        (["ingest", "/no/such/dir"], "no such file or directory: /no/such/dir"),
        (["ingest", "pyproject.toml"], "unsupported document type '.toml' for pyproject.toml"),
        (["ingest", "README.md", "--tenant", "zzz"], "unknown tenant 'zzz'"),
        (["ingest"], "the following arguments are required: path"),
        (["approve", "a b"], "invalid approval id 'a b'"),
        (["deny"], "the following arguments are required: ID"),
        (["approve", "ap-1"], "no approver identity in"),
        (["approvals"], "no approver identity in"),
        (["audit", "effects"], "the following arguments are required: --tenant"),
        (["audit", "effects", "--tenant", "a.b"], "invalid tenant 'a.b'"),
        (["audit", "effects", "--tenant", "acme", "--to", "x@y.test"], "--to needs the auditor key of acme"),
        (["audit", "effects", "--tenant", "acme"], "no identities in"),
    ],
)
def test_errors_are_one_line_with_a_nonzero_exit(tmp_path, args, message):
    result = meshctl(*args, home=str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_init_writes_secrets_private_and_prints_none(tmp_path):
    result = meshctl("init", "--tenants", "acme", home=str(tmp_path))
    assert result.returncode == 0
    secrets = [p for p in (tmp_path / "secrets").rglob("*") if p.is_file()]
    assert len(secrets) > 20
    for p in secrets:
        assert p.stat().st_mode & 0o077 == 0, f"{p} is readable by others"
        if p.suffix in (".creds", ".pem", ".nk"):
            text = p.read_text()
            assert text not in result.stdout and text[-40:] not in result.stdout
    assert "SU" not in result.stdout and "PRIVATE KEY" not in result.stdout
    # the audit key and the tenant's auditor key exist, private; the bundle names only the public half
    assert (tmp_path / "secrets" / "audit.key").exists() and (tmp_path / "secrets/keys/auditor.acme.key").exists()
    # the deployment's data key, which every service mounts: 32 random bytes as hex, private
    data_key = tmp_path / "secrets" / "data.key"
    assert len(bytes.fromhex(data_key.read_text().strip())) == 32 and data_key.stat().st_mode & 0o777 == 0o600
    bundle = json.loads((tmp_path / "trust-bundle.json").read_text())
    auditor = (tmp_path / "secrets/keys/auditor.acme.key").read_text().strip()
    assert set(bundle["auditors"]) == {"acme"} and bundle["auditors"]["acme"] != auditor


def usage(inp: int, out: int, cost: float, calls: int, cached: int = 0) -> dict:
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "cached_input_tokens": cached,
        "cost_usd": cost,
        "calls": calls,
    }


TASK = {
    "tenant": "acme",
    "task_id": "t1",
    "total": usage(1500, 300, 0.0123456789, 4, cached=200),
    "by_agent": {"planner/planner": usage(500, 100, 0.002, 1), "worker/worker": usage(1000, 200, 0.0103456789, 3)},
    "by_step": {"s1": usage(1000, 200, 0.0103456789, 3), "plan": usage(500, 100, 0.002, 1)},
    "by_model": {"scripted/fast": usage(1500, 300, 0.0123456789, 4)},
    "errors": 1,
    "call_ids": ["c1", "c2", "c3", "c4"],
    "updated_at": 1767225600.0,  # 2026-01-01 00:00:00 UTC
}


def section(text: str, title: str) -> list[str]:
    """The rows of the table headed ``title`` (up to the next blank line)."""
    block = text.split(title, 1)[1].split("\n\n", 1)[0]
    return block.splitlines()[1:]


def test_render_task_totals_and_every_breakdown_most_expensive_first():
    text = spend.render_task(TASK)
    head = text.splitlines()[0]
    assert head == (
        "task acme/t1: 1500 tokens in (200 cached), 300 out, 4 calls, $0.012346, 1 failed call "
        "(updated 2026-01-01 00:00:00 UTC)"
    )
    agents = section(text, "BY AGENT")
    assert [r.split()[0] for r in agents] == ["worker/worker", "planner/planner"]
    assert agents[0].split()[1:] == ["1000", "200", "3", "0.010346"]
    assert [r.split()[0] for r in section(text, "BY STEP")] == ["s1", "plan"]
    assert section(text, "BY MODEL")[0].split() == ["scripted/fast", "1500", "300", "4", "0.012346"]


def test_render_task_tolerates_missing_fields():
    text = spend.render_task({"tenant": "acme", "task_id": "t2"})
    assert text.startswith("task acme/t2: 0 tokens in, 0 out, 0 calls, $0.000000 (updated - UTC)")
    assert "BY STEP\n  (none)" in text


def test_render_day_ranks_tasks_by_cost_and_keeps_the_top_20():
    day = {
        "tenant": "acme",
        "day": "20260101",
        "total": usage(9000, 900, 1.5, 30),
        "by_agent": {"worker/worker": usage(9000, 900, 1.5, 30)},
        "by_model": {"scripted/fast": usage(9000, 900, 1.5, 30)},
        "tasks": 25,
    }
    tasks = [{"tenant": "acme", "task_id": f"t{i:02}", "total": usage(i, i, i / 100, 1)} for i in range(25)]
    text = spend.render_day(day, tasks)
    assert (
        text.splitlines()[0] == "tenant acme on 20260101 (UTC): 9000 tokens in, 900 out, 30 calls, $1.500000, 25 tasks"
    )
    assert section(text, "BY MODEL")[0].split() == ["scripted/fast", "9000", "900", "30", "1.500000"]
    assert "tasks: 20 of 25 (every retained day), most expensive first" in text
    rows = section(text, "UPDATED (UTC)")
    assert len(rows) == 20
    assert [r.split()[0] for r in rows[:3]] == ["t24", "t23", "t22"] and rows[-1].split()[0] == "t05"
    assert rows[0].split()[1:6] == ["24", "24", "1", "0.240000", "-"]


def test_render_day_without_a_day_record_still_lists_tasks():
    text = spend.render_day({"tenant": "acme", "day": "20260102"}, [TASK])
    assert text.splitlines()[0] == "tenant acme on 20260102 (UTC): no spend recorded"
    assert "BY AGENT" not in text
    assert section(text, "UPDATED (UTC)")[0].split()[:5] == ["t1", "1500", "300", "4", "0.012346"]


def test_render_days_one_line_per_tenant():
    days = [
        {"tenant": "globex", "day": "20260101", "total": usage(10, 5, 0.25, 2), "tasks": 1},
        {"tenant": "acme", "day": "20260101", "total": usage(20, 6, 0.5, 3), "tasks": 2},
    ]
    text = spend.render_days("20260101", days)
    assert text.startswith("spend on 20260101 (UTC)")
    assert [r.split() for r in section(text, "TENANT")] == [
        ["acme", "20", "6", "3", "0.500000", "2"],
        ["globex", "10", "5", "2", "0.250000", "1"],
    ]


def test_render_switches_global_first_with_age_and_reason():
    now = 1_000_000.0
    text = render_switches(
        {
            "kill.tenant.acme": {"reason": "runaway spend", "by": "admin", "at": now - 125},
            "kill.global": {"reason": "incident 42", "by": "admin", "at": now - 7200},
        },
        now,
    )
    lines = text.splitlines()
    assert lines[1].split() == ["global", "2h", "admin", "incident", "42"]
    assert lines[2].split() == ["tenant", "acme", "2m", "admin", "runaway", "spend"]
    assert render_switches({}, now) == "no kill switch is on"


def test_day_keys_are_the_budget_services():
    assert spend.usage_key("acme", "t1") == "usage.acme.t1"
    assert spend.day_key("acme", "20260101") == "tenant.acme.20260101"
    assert spend.today(1767225600.0) == "20260101"


def test_jetstream_unavailable_is_one_line_and_exit_1(monkeypatch, capsys):
    # A cluster that lost its quorum answers 503 to every JetStream API call: `meshctl status`
    # (and everything else) says so in one line and exits 1 ("try again"), not a traceback.
    from nats.js.errors import ServiceUnavailableError

    from meshctl import cli
    from meshctl.commands import mesh

    def unavailable(_args):
        raise ServiceUnavailableError(code=503, err_code=10008, description="JetStream system temporarily unavailable")

    monkeypatch.setattr(mesh, "cmd_status", unavailable)
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "JetStream did not answer" in err[0] and "temporarily unavailable" in err[0], err


@pytest.mark.parametrize("argv", [["rotate"], ["rotate", "worker", "--all"]])
def test_rotate_without_one_principal_or_all_is_one_line_and_exit_2(argv, capsys, tmp_path):
    # It used to end in a traceback: its parser set no ``usage`` (every other command's does).
    from meshctl import cli

    with pytest.raises(SystemExit) as exited:
        cli.main(["--home", str(tmp_path), *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "name one principal, or --all" in err[0], err
