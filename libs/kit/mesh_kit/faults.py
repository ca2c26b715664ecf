"""Fault injection for the chaos suite, off unless ``MESH_FAULTS`` names a point.

``MESH_FAULTS=after_effect`` makes the process die (``os._exit``, no cleanup, like
``kill -9``) the first time it passes that point. "First" is remembered in
``MESH_FAULTS_DIR`` so a restarted process does not die again.

``MESH_FAULTS=poison`` makes every handler of the process fail (an ordinary exception, as a
handler bug would raise) on any message whose body contains ``POISON_MARKER``, on every
attempt: a poison message. Never set in production.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mesh_kit.errors import KitError

POISON_MARKER = b"#poison-pill#"
# Read from the environment, not from the service's settings: test-only fault injection, never a
# production setting, and checked where no settings object is at hand.
_POISON = "poison" in os.environ.get("MESH_FAULTS", "").split(",")  # read once: the check is per message


class InjectedPoison(RuntimeError, KitError):
    """The failure a poison message causes (``MESH_FAULTS=poison``)."""


def poison_point(model: Any) -> None:
    """The message (as decoded: a sealed body holds the marker only inside) holds the marker: fail."""
    if _POISON and POISON_MARKER in model.model_dump_json().encode():
        raise InjectedPoison("injected poison: this message fails on every attempt")


def crash_point(name: str) -> None:
    if name not in os.environ.get("MESH_FAULTS", "").split(","):
        return
    marker = Path(os.environ.get("MESH_FAULTS_DIR", ".")) / f"fault-{name}.fired"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    os._exit(137)
