"""Which tenants a budget replica follows, when the monitor's work is split (``MESH_BUDGET_PARTITIONS``).

With one partition (the default) every replica follows every task: any of them reaches every
trip, and a second replica only adds reading. With ``N`` partitions each tenant belongs to one
(a stable hash of its id), and a replica of partition ``i`` folds only its tenants' messages:
their tasks' watches, breakers, deadlocks, stalls and queue times, and their spend records
(``mesh_budget.accounts``, complete to a mark of the partition's own). The work of following the
mesh is then split across partitions instead of repeated by every replica.

What every replica still does, whatever its partition: answer reservations for any task (the
Redis view they are decided on is shared; a task's breakers reach a replica of another partition
through the cancel its owner publishes, which every service's guard follows), settle its share
of the usage durable's calls in that view (which also feeds the provider breakers: they are
mesh-wide, and live there), and answer ``budget.status`` for its own partition (``meshctl`` asks
them all and adds the partitions up). Another partition's messages are dropped by subject,
before they are parsed or verified.

The partition is by tenant, not by task, so that a tenant's day record has one writer; one
tenant's tasks are therefore followed by one partition, however many there are. Run at least one
replica per partition (a StatefulSet's pods take theirs from their ordinal, modulo the count);
two per partition for a standby (a StatefulSet of ``2 * N`` replicas).
"""

from __future__ import annotations

import re
import socket
import zlib
from dataclasses import dataclass

LEGACY_MARK = "accounts"
"""The spend records' mark with one partition (the key it always had)."""


@dataclass(frozen=True)
class Partition:
    index: int = 0
    count: int = 1

    def owns(self, tenant: str) -> bool:
        """Whether this replica follows ``tenant``'s tasks."""
        return self.count == 1 or zlib.crc32(tenant.encode()) % self.count == self.index

    @property
    def mark_key(self) -> str:
        """The key (bucket ``budget``) of this partition's spend-record mark."""
        return LEGACY_MARK if self.count == 1 else f"{LEGACY_MARK}.{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index + 1} of {self.count}"


def mark_keys(largest: int = 16) -> list[str]:
    """Every mark key a budget of up to ``largest`` partitions may have written, the legacy one
    first: a partition starting without a mark of its own starts from the earliest of them."""
    return [LEGACY_MARK] + [f"{LEGACY_MARK}.{i}-of-{n}" for n in range(2, largest + 1) for i in range(n)]


_ORDINAL = re.compile(r"-(\d+)$")


def from_settings(count: int, index: int | None, hostname: str | None = None) -> Partition:
    """The replica's partition: ``index`` when set, else (several partitions) the ordinal its host
    name ends in, modulo ``count`` (a StatefulSet's pods ``budget-0`` ... ``budget-3`` with two
    partitions follow 0, 1, 0, 1: two replicas each). ``ValueError`` says what is wrong."""
    if count < 1:
        raise ValueError(f"MESH_BUDGET_PARTITIONS must be at least 1, not {count}")
    if index is None:
        if count == 1:
            return Partition()
        host = hostname if hostname is not None else socket.gethostname()
        found = _ORDINAL.search(host)
        if found is None:
            raise ValueError(
                f"MESH_BUDGET_PARTITIONS={count} needs MESH_BUDGET_PARTITION (0 to {count - 1}) or a host name "
                f"ending in -<ordinal> as a StatefulSet's pods have; this host is {host!r}"
            )
        return Partition(int(found.group(1)) % count, count)
    if not 0 <= index < count:
        raise ValueError(f"MESH_BUDGET_PARTITION must be 0 to {count - 1} with {count} partitions, not {index}")
    return Partition(index, count)
