"""The root of every exception mesh_eval raises (``EvalError``): a problem the operator can fix, told
in one line. Each is raised beside the code that finds it; ``one_line`` folds the text it quotes."""

from __future__ import annotations


class EvalError(Exception):
    """A problem the operator can fix; its text is one line."""


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) one space."""
    return " ".join(str(text).split())
