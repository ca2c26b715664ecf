"""Service processes a warm standby forks, as children of the supervisor (``meshctl.standby``).

A standby forks a copy of itself twice over, so the copy's parent exits at once and the copy is
given to the nearest *subreaper* above it: the supervisor, once it has asked to be one (Linux
``prctl(PR_SET_CHILD_SUBREAPER)``). It is then the supervisor's child like a process it started:
``poll`` reaps it and says how it ended. Everything else given to it (a killed service's own
children, e.g. MCP servers) is reaped by ``reap_strays``, or it would stay a zombie.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Callable, Collection

PR_SET_CHILD_SUBREAPER = 36

adopted: set[int] = set()
"""Pids of the copies this process watches (``adopt``) until it has reaped them."""


def become_subreaper() -> bool:
    """Make this process the one its orphaned descendants are given to. False where that is not
    possible (not Linux): then a standby is used once, as the process itself."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def adopt(pid: int) -> None:
    adopted.add(pid)


def poll(pid: int, alive: Callable[[], bool]) -> int | None:
    """The exit status of an adopted ``pid`` once it has ended (reaped then), None while it runs."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not given to this process after all: how it ended is unknown
        if alive():
            return None
        adopted.discard(pid)
        return 1
    if done == 0:
        return None
    adopted.discard(pid)
    return os.waitstatus_to_exitcode(status)


def forget(pid: int) -> None:
    """Reap an adopted ``pid`` that was stopped (SIGTERM or SIGKILL sent): it ends or has ended."""
    if pid in adopted:
        adopted.discard(pid)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def reap_strays(started: Collection[int]) -> None:
    """Reap the descendants given to this subreaper that are neither ``started`` nor adopted."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in started or info.si_pid in adopted:
            return  # nothing ended, or one of ours: its own poll reaps it
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)
