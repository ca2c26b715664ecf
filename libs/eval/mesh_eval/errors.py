"""The root of every exception mesh_eval raises (``EvalError``): a problem the operator can fix, told
in one line. Each is raised beside the code that finds it."""

from __future__ import annotations


class EvalError(Exception):
    """A problem the operator can fix; its text is one line."""
