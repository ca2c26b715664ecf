"""A tenant-settings admin MCP server: the example server the tool-executor mounts over stdio.

Run it as ``python -m mesh_tool_executor.mcp_servers.admin``. It speaks MCP on stdin/stdout and
keeps its state in a JSON file (``MESH_ADMIN_STATE``; default: a file in the temp directory), so
a test or the demo can see from outside whether a write tool really ran.

``get_setting`` is read-only and ``set_setting`` writes: the pair is what the tool-executor's
policy needs to show risk classes on mounted tools. The annotations below are hints for
clients; the tool-executor's own config, not these hints, decides a mounted tool's risk.

A value stored as ``!<reason>`` marks a setting unavailable: reading it is an MCP error that says
why. The reason is text someone stored, so it is how the tests send outside text down the error
channel (an ``isError`` result).

``MESH_ADMIN_TEST_TOOLS=1`` adds ``slow(seconds)``, which only exists so tests can exercise call
timeouts; it stays hidden otherwise so the demo's agents never see it.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Annotated

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

# The same identifier shape the mesh uses for tenants; the pattern ends up in the input schema,
# so a caller validating against the schema rejects a bad tenant before the call is sent.
Tenant = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Tenant id")]
Key = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.]{0,63}$", description="Setting key, e.g. 'billing.plan'")]
Value = Annotated[str, Field(max_length=1000, description="New value")]

# Sync tools run in worker threads: one lock keeps read-modify-write of the file atomic.
_lock = threading.Lock()


def state_path() -> Path:
    # Its own environment, not the tool-executor's settings: a separate process, whose variables
    # come from the MCP config's "env" for this server.
    return Path(os.environ.get("MESH_ADMIN_STATE") or Path(tempfile.gettempdir()) / "mesh-admin-state.json")


def _load(path: Path) -> dict[str, dict[str, str]]:
    try:
        state: dict[str, dict[str, str]] = json.loads(path.read_text(encoding="utf-8"))
        return state
    except FileNotFoundError:
        return {}


def _save(path: Path, state: dict[str, dict[str, str]]) -> None:
    # Write then rename: a reader (or a crash) never sees a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


server: MCPServer = MCPServer("admin", instructions="Tenant settings administration", log_level="WARNING")


@server.tool(annotations=ToolAnnotations(read_only_hint=True, open_world_hint=False))
def get_setting(tenant: Tenant, key: Key) -> str:
    """Read one setting of a tenant."""
    with _lock:
        value = _load(state_path()).get(tenant, {}).get(key)
    if value is None:
        raise ToolError(f"tenant {tenant} has no setting {key}")
    if value.startswith("!"):
        raise ToolError(f"setting {key} is unavailable: {value[1:]}")
    return value


@server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True))
def set_setting(tenant: Tenant, key: Key, value: Value) -> str:
    """Change one setting of a tenant; returns the previous value."""
    with _lock:
        path = state_path()
        state = _load(path)
        previous = state.setdefault(tenant, {}).get(key)
        state[tenant][key] = value
        _save(path, state)
    return f"{tenant}.{key} = {value!r} (was {previous!r})"


async def slow(seconds: Annotated[float, Field(ge=0, le=60)]) -> str:
    """Sleep, then answer (test servers only)."""
    await anyio.sleep(seconds)
    return f"slept {seconds}s"


if os.environ.get("MESH_ADMIN_TEST_TOOLS") == "1":  # test-only, from the MCP config's "env" (see state_path)
    server.add_tool(slow, annotations=ToolAnnotations(read_only_hint=True))


if __name__ == "__main__":
    server.run("stdio")
