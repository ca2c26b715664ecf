"""Fixtures for the integration tests (helpers they import are in ``integration_helpers``)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest


@pytest.fixture
def unique() -> Callable[[str], str]:
    counter = iter(range(10**6))
    stamp = str(int(time.time() * 1000))[-7:]
    return lambda prefix: f"{prefix}-{stamp}-{next(counter)}"
