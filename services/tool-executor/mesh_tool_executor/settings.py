"""The tool-executor's settings: the common ones, the tool policy, human approval, MCP mounts,
the HTTP tool's allow-list and the audit key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Self

from pydantic import Field, PrivateAttr, model_validator

from mesh_kit.settings import OptionalPath, ServiceSettings
from mesh_tool_executor import net


class ToolExecutorSettings(ServiceSettings):
    """Everything the tool-executor reads. ``policy``, ``allow`` and ``audit_key`` are the parsed
    values, checked when the settings are built (a bad one stops the service at start-up)."""

    approval_timeout_s: float = Field(3600.0, gt=0)
    """How long a call held for a human waits for a decision before it is denied (expired)."""
    notes_per_tenant: int = Field(1000, ge=0)
    """Most notes a tenant may keep in KV ``notes`` (each at most 20,000 characters); a
    ``note_write`` of a new note past it is refused with the reason. 0: no limit."""
    tool_policy: str = ""
    """Per-tool policy overrides: a JSON object, inline or in the file this names, e.g.
    ``{"send_email": {"on_untrusted": "deny"}, "admin__set_setting": {"risk": "write"}}``."""
    mcp_config: OptionalPath = None
    """JSON file of the MCP servers to mount (``{"servers": [...]}``, started over stdio)."""
    tool_secrets_dir: OptionalPath = None
    """Where tenants' tool-server secrets are mounted: ``<dir>/<tenant>/<name>`` holds the secret a
    server record names (a bearer token, an OAuth client secret, a CA bundle). Read when a server
    connects; never put in a message, a record or a log."""
    tool_server_check_s: float = Field(15.0, gt=0)
    """How often every endpoint of the tenants' tool servers is pinged and each server's tools are
    listed again (a changed definition is suspended at the next listing)."""
    tool_servers_per_tenant: int = Field(20, ge=0)
    """Most tool servers a tenant may register (each holds a session per endpoint in every replica)."""
    http_allow: str = ""
    """Comma-separated host names and CIDRs the HTTP tool may reach although they are not public
    (no wildcards), e.g. ``10.0.0.0/8,intranet.acme.test``."""
    audit_key_file: OptionalPath = None
    """The deployment's audit key (hex), which keys the hashes of where effects went; without it
    the audit records a destination's domain and its sealed value, and no hash."""

    _policy: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)
    _allow: net.AllowList = PrivateAttr(default_factory=net.AllowList)
    _audit_key: bytes | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _parse(self) -> Self:
        self._policy = _policy(self.tool_policy)
        self._allow = net.AllowList.parse(self.http_allow)  # its errors name MESH_HTTP_ALLOW
        self._audit_key = _audit_key(self.audit_key_file)
        return self

    @property
    def policy(self) -> dict[str, dict[str, Any]]:
        """``MESH_TOOL_POLICY``: tool name -> policy overrides."""
        return self._policy

    @property
    def allow(self) -> net.AllowList:
        """``MESH_HTTP_ALLOW``, parsed."""
        return self._allow

    @property
    def audit_key(self) -> bytes | None:
        """The key in ``MESH_AUDIT_KEY_FILE`` (None without one)."""
        return self._audit_key


def _policy(value: str) -> dict[str, dict[str, Any]]:
    raw = value.strip()
    if raw and not raw.startswith("{"):
        try:
            raw = Path(raw).read_text()
        except OSError as exc:
            raise ValueError(f"MESH_TOOL_POLICY: cannot read {raw}: {exc.strerror}") from None
    try:
        policy = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise ValueError(f"MESH_TOOL_POLICY: {exc}") from None
    if not isinstance(policy, dict):
        raise ValueError("MESH_TOOL_POLICY must be a JSON object of tool name -> policy overrides")
    return policy


def _audit_key(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return bytes.fromhex(path.read_text().strip())
    except OSError as exc:
        raise ValueError(f"MESH_AUDIT_KEY_FILE: cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ValueError(f"MESH_AUDIT_KEY_FILE: {path} does not hold a hex key ({exc})") from None
