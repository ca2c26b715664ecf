"""The root of every exception the gateway raises: ``except A2aGatewayError`` catches any of them.

A caller the gateway will not serve is told so by the edge's own ``Unauthorized`` (HTTP 401) and
``Forbidden`` (403), raised while it signs them in; what is particular to A2A is below."""

from __future__ import annotations


class A2aGatewayError(Exception):
    """Raised by the A2A gateway (a subclass says what)."""


class NotExposed(A2aGatewayError):
    """The tenant exposes no agent of that name: HTTP 404."""


class BadAsk(A2aGatewayError, ValueError):
    """A message that names no task the mesh can run (no goal, bad inputs or policy): the A2A
    task is rejected with this line."""
