"""The root of every exception the rag service raises: ``except RagError`` catches any of them, and
nothing of another package's. Each exception stays beside the code that raises it."""

from __future__ import annotations


class RagError(Exception):
    """Raised by mesh_rag (a subclass says what)."""
