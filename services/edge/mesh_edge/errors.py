"""The root of every exception the edge raises: ``except EdgeError`` catches any of them."""

from __future__ import annotations


class EdgeError(Exception):
    """Raised by the edge (a subclass says what: HTTP 400, 401 or 403)."""
