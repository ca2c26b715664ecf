"""The ``#call:`` cue of the scripted model: how a test drives a tool it cannot otherwise make a
model want. ``#call: orders__get_order {"order_id": "o-1"}`` in a step's instruction makes the
scripted model call exactly that tool with those arguments (several cues: in order, once each),
then answer from the last result."""

from __future__ import annotations

import json
import re
from typing import Any

CALL_CUE = re.compile(r"#call:\s*([A-Za-z_][\w-]*)\s*(\{[^\n]*?\})(?=\s*(?:#call:|$))", re.M)


def calls(instruction: str) -> list[tuple[str, dict[str, Any]]]:
    """The calls a step's cues ask for (one whose arguments are not a JSON object is skipped)."""
    out = []
    for m in CALL_CUE.finditer(instruction):
        try:
            args = json.loads(m.group(2))
        except json.JSONDecodeError:
            continue
        if isinstance(args, dict):
            out.append((m.group(1), args))
    return out
