"""Log lines of a kind, at most so many a minute."""

from __future__ import annotations

import logging
import time


class Throttled:
    """One warning line per rejected message, up to ``per_min`` a minute; beyond that, one line
    a minute saying how many were not logged (a flood of garbage must not flood the logs too:
    every one of them is in the DLQ with its reason, and counted)."""

    def __init__(self, logger: logging.Logger, per_min: int) -> None:
        self.log, self.per_min = logger, per_min
        self.window, self.logged, self.quiet, self.last = 0.0, 0, 0, ""

    def warn(self, line: str) -> None:
        now = time.monotonic()
        if now - self.window >= 60.0:
            if self.quiet:
                self.log.warning("%d more message(s) rejected in the last minute, not logged (latest: %s)",
                                 self.quiet, self.last)  # fmt: skip
            self.window, self.logged, self.quiet = now, 0, 0
        if self.logged < self.per_min:
            self.logged += 1
            self.log.warning("%s", line)
        else:
            self.quiet += 1
            self.last = line[:300]
