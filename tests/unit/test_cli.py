"""meshctl: a bad argument or an impossible request is one clear line and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def meshctl(*args: str, home: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshctl", "--home", home, *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "--tenant", "a.b", "x"], "invalid tenant 'a.b'"),
        (["submit"], "the following arguments are required: goal"),
        (["submit", "x", "--timeout", "-3"], "must be > 0"),
        (["up", "--nats-port", "99999"], "not a port number: '99999'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["status"], "no mesh is running from"),
        (["submit", "hi", "--tenant", "zzz"], "unknown tenant 'zzz'"),
        (["dlq", "show", "x"], "invalid int value: 'x'"),
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
