"""Push notifications: the SDK's sender, posting a task's updates to the caller's webhook, and the
gate every webhook URL passes first (both when it is set and before each send).

A caller names the URL, so the gateway would post wherever it is told: to a metadata service, an
admin port, anything its network reaches (server-side request forgery). With
``MESH_A2A_PUSH_ALLOWED_HOSTS`` set only those hosts are posted to; without it, only hosts whose
every address is public (the SDK's own check). Redirects are not followed (a public host could
redirect inward). Token chunks are not pushed (one request per model token would be a flood):
status changes and the final answer are."""

from __future__ import annotations

import fnmatch
import urllib.parse
from collections.abc import Awaitable, Callable

import httpx
from a2a.server.tasks import BasePushNotificationSender, PushNotificationConfigStore, PushNotificationEvent
from a2a.types import TaskArtifactUpdateEvent
from a2a.utils.push_url_validator import validate_push_notification_url

from mesh_a2a.mapping import DRAFT

Check = Callable[[str], Awaitable[bool]]


def host_allowed(url: str, allowed: list[str]) -> bool:
    """Whether ``url`` is http(s) to a listed host: ``host`` (any port), ``host:port`` or
    ``*.domain`` (its subdomains), case-insensitive; no user info in the URL."""
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        return False
    host = (parsed.hostname or "").lower()
    if parsed.scheme not in ("http", "https") or not host or parsed.username or parsed.password:
        return False
    for entry in (a.strip().lower() for a in allowed):
        name, _, want = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if want and (not want.isdigit() or int(want) != port):
            continue
        if name.startswith("*.") and fnmatch.fnmatchcase(host, name) and host != name[2:]:
            return True
        if host == name:
            return True
    return False


def url_check(allowed: list[str]) -> Check:
    """The gate of webhook URLs (``MESH_A2A_PUSH_ALLOWED_HOSTS``: ``allowed``)."""

    async def check(url: str) -> bool:
        if allowed:
            return host_allowed(url, allowed)
        return await validate_push_notification_url(url)

    return check


class Sender(BasePushNotificationSender):
    """The SDK's sender, quiet about token chunks (``draft-*`` artifacts)."""

    def __init__(self, store: PushNotificationConfigStore, check: Check, timeout_s: float = 10.0) -> None:
        client = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        super().__init__(client, store, push_url_validator=check)
        self.client = client

    async def send_notification(self, task_id: str, event: PushNotificationEvent) -> None:
        if isinstance(event, TaskArtifactUpdateEvent) and event.artifact.artifact_id.startswith(DRAFT):
            return
        await super().send_notification(task_id, event)

    async def aclose(self) -> None:
        await self.client.aclose()
