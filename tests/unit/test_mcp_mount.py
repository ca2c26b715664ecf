"""Mounting MCP servers over stdio (mesh_tool_executor.mcp_mount) with the example admin server.

The servers are real child processes speaking MCP through the official SDK; the admin server's
state file shows from outside whether a write tool really ran. A server start costs about 1.5 s
(importing the SDK), so the tests that leave the server as they found it share one module-wide
mount (and event loop); killing and closing get mounts of their own.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from mesh_tool_executor.mcp_mount import McpMount, McpServerConfig, McpToolError, load_config

pytestmark = pytest.mark.unit

ADMIN_ARGS = ("-m", "mesh_tool_executor.mcp_servers.admin")
POLICY = {"set_setting": {"risk": "write", "needs_approval": True, "timeout_s": 5}, "get_setting": {"risk": "read"}}


def admin(state: Path, **overrides: object) -> McpServerConfig:
    values: dict = {
        "name": "admin",
        "command": sys.executable,
        "args": ADMIN_ARGS,
        "env": {"MESH_ADMIN_STATE": str(state), "MESH_ADMIN_TEST_TOOLS": "1"},
        "tools": POLICY,
    }
    return McpServerConfig(**(values | overrides))


def servers(cmdline_part: str = "mcp_servers.admin", *, besides: frozenset[int] = frozenset()) -> list[psutil.Process]:
    """Our child processes running the example server (zombies included: they have no cmdline),
    leaving out ``besides`` (the module-wide mount's server)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in besides and (
                child.status() == psutil.STATUS_ZOMBIE or cmdline_part in " ".join(child.cmdline())
            ):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def existing() -> frozenset[int]:
    return frozenset(p.pid for p in servers())


async def until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


shared_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mounted(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[McpMount, Path]]:
    tmp_path = tmp_path_factory.mktemp("mcp")
    state = tmp_path / "state.json"
    mount = McpMount(
        [
            admin(state),
            McpServerConfig(name="ghost", command=str(tmp_path / "no-such-server")),
            McpServerConfig(
                name="crash", command=sys.executable, args=("-c", "import sys; sys.exit('boom: bad config')")
            ),
        ]
    )
    await mount.start()
    try:
        yield mount, state
    finally:
        await mount.close()


# --- config -----------------------------------------------------------------------------------


def test_load_config(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(
        json.dumps(
            {
                "servers": [
                    {
                        "name": "admin",
                        "command": "python",
                        "args": list(ADMIN_ARGS),
                        "env": {"MESH_ADMIN_STATE": "state.json"},
                        "cwd": "servers",
                        "tools": POLICY,
                        "default_risk": "write",
                        "startup_timeout_s": 5,
                    },
                    {"name": "other_1", "command": "/opt/mcp/bin/other"},
                ]
            }
        )
    )
    first, second = load_config(path)
    assert first == McpServerConfig(
        name="admin",
        command="python",
        args=ADMIN_ARGS,
        env={"MESH_ADMIN_STATE": "state.json"},
        cwd=str(tmp_path / "servers"),  # relative to the file, not to wherever the service runs
        tools=POLICY,
        default_risk="write",
        startup_timeout_s=5,
    )
    assert second == McpServerConfig(name="other_1", command="/opt/mcp/bin/other")
    assert second.default_risk == "external"


@pytest.mark.parametrize(
    ("servers_json", "message"),
    [
        ([{"name": "Admin", "command": "x"}], r"servers\[0\]\.name: must match"),
        ([{"name": "a__b", "command": "x"}], r"servers\[0\]\.name: must match .* without '__'"),
        ([{"name": "a"}], r"servers\[0\]\.command: required"),
        ([{"name": "a", "command": ""}], r"servers\[0\]\.command: must be a non-empty string"),
        ([{"name": "a", "command": "x", "args": "-v"}], r"servers\[0\]\.args: must be a list of strings"),
        ([{"name": "a", "command": "x", "args": [1]}], r"servers\[0\]\.args: must be a list of strings"),
        ([{"name": "a", "command": "x", "env": {"K": 1}}], r"servers\[0\]\.env: must be an object of string values"),
        ([{"name": "a", "command": "x", "tools": {"t": {"risk": "none"}}}], r"servers\[0\]\.tools\.t\.risk: must be"),
        ([{"name": "a", "command": "x", "tools": {"t": {"risk_": "read"}}}], r"servers\[0\]\.tools\.t: unknown key"),
        ([{"name": "a", "command": "x", "tools": {"t": {"timeout_s": 0}}}], r"servers\[0\]\.tools\.t\.timeout_s"),
        (
            [{"name": "a", "command": "x", "tools": {"t": {"needs_approval": "no"}}}],
            r"servers\[0\]\.tools\.t\.needs_approval",
        ),
        ([{"name": "a", "command": "x", "tools": {"t": {"rate_per_min": 1.5}}}], r"\.tools\.t\.rate_per_min"),
        ([{"name": "a", "command": "x", "default_risk": "low"}], r"servers\[0\]\.default_risk: must be one of"),
        ([{"name": "a", "command": "x", "startup_timeout_s": -1}], r"servers\[0\]\.startup_timeout_s"),
        ([{"name": "a", "command": "x", "comand": "y"}], r"servers\[0\]: unknown key 'comand'"),
        ([{"name": "a", "command": "x"}, {"name": "a", "command": "y"}], r"servers\[1\]\.name: 'a' is used twice"),
        (["a"], r"servers\[0\]: must be an object"),
        ({"name": "a"}, r'exactly one key, "servers"'),
    ],
)
def test_load_config_errors_name_the_field(tmp_path: Path, servers_json: object, message: str) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"servers": servers_json}))
    with pytest.raises(ValueError, match=message) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_load_config_bad_json(tmp_path: Path) -> None:
    path = tmp_path / "mcp.json"
    path.write_text("{servers: []}")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_config(path)
    with pytest.raises(ValueError, match="cannot read"):
        load_config(tmp_path / "missing.json")


# --- a mounted server -------------------------------------------------------------------------


@shared_loop
async def test_mounts_tools_and_skips_servers_that_fail(mounted: tuple[McpMount, Path]) -> None:
    mount, _ = mounted
    tools = {t.name: t for t in mount.tools()}
    assert set(tools) == {"admin__get_setting", "admin__set_setting", "admin__slow"}
    setter = tools["admin__set_setting"]
    assert (setter.server, setter.remote_name, setter.risk) == ("admin", "set_setting", "write")
    assert setter.policy == {"risk": "write", "needs_approval": True, "timeout_s": 5}
    assert setter.input_schema["required"] == ["tenant", "key", "value"]
    assert set(setter.input_schema["properties"]) == {"tenant", "key", "value"}
    assert "previous value" in setter.description
    assert setter.annotations["readOnlyHint"] is False
    # The server calls slow read-only; no policy names it, so the config's default decides.
    slow = tools["admin__slow"]
    assert slow.annotations["readOnlyHint"] is True and slow.risk == "external" and slow.policy == {}

    assert set(mount.errors) == {"ghost", "crash"}
    assert mount.errors["ghost"].startswith("cannot run ") and "No such file" in mount.errors["ghost"]
    assert mount.errors["crash"] == "exited during startup; stderr: boom: bad config"
    assert mount.alive("admin") and not mount.alive("ghost") and not mount.alive("nope")


@shared_loop
async def test_set_get_and_invalid_arguments(mounted: tuple[McpMount, Path]) -> None:
    mount, state = mounted
    reply = await mount.call("admin__set_setting", {"tenant": "acme", "key": "billing.plan", "value": "gold"}, 5)
    assert reply == "acme.billing.plan = 'gold' (was None)"
    assert json.loads(state.read_text())["acme"]["billing.plan"] == "gold"  # the file other tests share
    assert await mount.call("admin__get_setting", {"tenant": "acme", "key": "billing.plan"}, 5) == "gold"
    # A tool that reports an error (isError) is an McpToolError with the server's text.
    with pytest.raises(McpToolError, match=r"tenant acme has no setting billing\.owner"):
        await mount.call("admin__get_setting", {"tenant": "acme", "key": "billing.owner"}, 5)

    # Invalid arguments never reach the server. The messages are the mount's own (the server's
    # would read "Error executing tool ..."), and the state file is untouched.
    before = state.read_bytes()
    for arguments, message in [
        ({"tenant": "acme", "key": "plan"}, r"\$: 'value' is a required property"),
        ({"tenant": "acme", "key": "plan", "value": 5}, r"\$\.value: 5 is not of type 'string'"),
        ({"tenant": "acme corp", "key": "plan", "value": "x"}, r"\$\.tenant: 'acme corp' does not match"),
        ({"tenant": "acme", "key": "plan", "value": "x" * 5000}, r"\$\.value: fails maxLength 1000$"),
        # the server's schema says nothing of other properties: read closed, an extra is refused
        ({"tenant": "acme", "key": "plan", "value": "x", "as_tenant": "globex"}, r"unexpected argument 'as_tenant'"),
    ]:
        with pytest.raises(McpToolError, match=r"^invalid arguments for admin__set_setting: " + message):
            await mount.call("admin__set_setting", arguments, 5)
    assert state.read_bytes() == before
    with pytest.raises(McpToolError, match="unknown MCP tool admin__drop_tenant"):
        await mount.call("admin__drop_tenant", {}, 5)


@shared_loop
async def test_timeouts_and_concurrent_calls(mounted: tuple[McpMount, Path]) -> None:
    mount, _ = mounted
    with pytest.raises(McpToolError, match=r"admin__slow timed out after 0.3s"):  # (it would answer at 10 s)
        await mount.call("admin__slow", {"seconds": 10}, 0.3)

    # Calls to one server do not queue behind each other.
    slow = asyncio.create_task(mount.call("admin__slow", {"seconds": 1.0}, 5))
    await mount.call("admin__set_setting", {"tenant": "acme", "key": "plan", "value": "gold"}, 5)
    assert not slow.done()
    assert await slow == "slept 1.0s"


async def test_a_killed_server_is_restarted_on_the_next_call(tmp_path: Path) -> None:
    others = existing()
    mount = McpMount([admin(tmp_path / "state.json")])
    await mount.start()
    try:
        await mount.call("admin__set_setting", {"tenant": "acme", "key": "plan", "value": "gold"}, 5)
        (child,) = servers(besides=others)
        child.kill()
        await until(lambda: not mount.alive("admin"))

        assert await mount.call("admin__get_setting", {"tenant": "acme", "key": "plan"}, 5) == "gold"
        assert mount.alive("admin")
        (restarted,) = servers(besides=others)
        assert restarted.pid != child.pid and not psutil.pid_exists(child.pid)
    finally:
        await mount.close()


async def test_server_stderr_goes_to_the_log_not_the_terminal(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    script = "import sys; print('server noise', file=sys.stderr); sys.exit(2)"
    mount = McpMount([McpServerConfig(name="noisy", command=sys.executable, args=("-c", script))])
    with caplog.at_level("DEBUG", logger="mesh.tool-executor.mcp"):
        await mount.start()
    await mount.close()
    assert mount.errors == {"noisy": "exited during startup; stderr: server noise"}
    assert "server noise" not in "".join(capfd.readouterr())
    assert "mcp noisy stderr: server noise" in caplog.text


async def test_close_leaves_no_child_process(tmp_path: Path) -> None:
    others = existing()
    mount = McpMount(
        [
            admin(tmp_path / "state.json"),
            # Starts but never answers: killed at its startup timeout.
            McpServerConfig(
                name="mute",
                command=sys.executable,
                args=("-c", "import time; time.sleep(60)"),
                startup_timeout_s=0.5,
            ),
        ]
    )
    await mount.start()
    assert mount.errors == {"mute": "no answer to initialize within 0.5s"}
    assert servers("time.sleep", besides=others) == []
    (child,) = servers(besides=others)

    await mount.close()
    assert servers(besides=others) == [] and not psutil.pid_exists(child.pid)
    with pytest.raises(McpToolError, match="shut down"):
        await mount.call("admin__get_setting", {"tenant": "acme", "key": "plan"}, 5)
