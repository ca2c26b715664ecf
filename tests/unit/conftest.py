"""Unit tests run without a data keyring (content clear) unless they install one: a test that
calls ``meshctl`` with a home installs that home's keyring for the process, and it must not
leak into the next test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mesh_contracts import sealing


@pytest.fixture(autouse=True)
def _no_keyring_leaks() -> Iterator[None]:
    before = sealing.installed()
    sealing.install(None)
    yield
    sealing.install(before)
