"""Fault injection for the chaos suite, off unless ``MESH_FAULTS`` names a point.

``MESH_FAULTS=after_effect`` makes the process die (``os._exit``, no cleanup, like
``kill -9``) the first time it passes that point. "First" is remembered in
``MESH_FAULTS_DIR`` so a restarted process does not die again. Never set in production.
"""

from __future__ import annotations

import os
from pathlib import Path


def crash_point(name: str) -> None:
    if name not in os.environ.get("MESH_FAULTS", "").split(","):
        return
    marker = Path(os.environ.get("MESH_FAULTS_DIR", ".")) / f"fault-{name}.fired"
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    os._exit(137)
