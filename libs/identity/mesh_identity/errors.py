"""The root of every exception mesh_identity raises (``IdentityError``): a token or a bundle that is
not to be believed. Each is raised beside the code that judges it."""

from __future__ import annotations


class IdentityError(Exception):
    """A message's identity token is missing, invalid, or does not entitle its sender."""


class UnknownKey(IdentityError):
    """The token names a principal, or was signed with a key, that this process's trust bundle
    does not hold. Forged, or signed under a bundle published after the one in force here (a
    rotation reaches every process within a second, not at the same instant): the mesh reads the
    published bundle once and judges again before it refuses the message."""
