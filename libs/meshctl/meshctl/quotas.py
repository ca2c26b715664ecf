"""What each tenant holds of its quotas (``mesh_tenancy.quota``), for ``meshctl status``.

Every service keeps its own keys of KV ``quotas`` (``<service>.<tenant>.<stream>``): what it stored
for the tenant in each stream. A row adds the services' records of one stream up against the
tenant's one quota there; the DLQ's quota is split among the services, so its row adds the
limits up too."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mesh_contracts.topology import DLQ_STREAM
from mesh_contracts.v1.records import QuotaRecord
from mesh_tenancy.quota import expire


@dataclass
class Held:
    """One tenant's use of one stream."""

    tenant: str
    stream: str
    bytes: int = 0
    msgs: int = 0
    limit_bytes: int = 0
    limit_msgs: int = 0
    refused: dict[str, int] = field(default_factory=dict)


def summarise(records: dict[str, dict[str, Any]], now: float | None = None) -> list[Held]:
    """(tenant, stream) rows from the bucket's records (key -> JSON), what is held as of ``now``."""
    at = time.time() if now is None else now
    rows: dict[tuple[str, str], Held] = {}
    for key, raw in records.items():
        parts = key.split(".")
        if len(parts) != 3:
            continue
        _, tenant, stream = parts
        try:
            rec = QuotaRecord.model_validate(raw)
        except ValueError:
            continue
        if rec.window_s:
            expire(rec, rec.window_s, at)  # what has aged out of the stream since the last charge
        b, m = rec.held_now()
        row = rows.setdefault((tenant, stream), Held(tenant, stream))
        row.bytes, row.msgs = row.bytes + b, row.msgs + m
        if stream == DLQ_STREAM:  # each service holds its share of the DLQ quota
            row.limit_bytes += rec.limit_bytes
            row.limit_msgs += rec.limit_msgs
        else:  # every service that stores in the stream counts against the tenant's one quota there
            row.limit_bytes = max(row.limit_bytes, rec.limit_bytes)
            row.limit_msgs = max(row.limit_msgs, rec.limit_msgs)
        for code, n in rec.refused.items():
            row.refused[code] = row.refused.get(code, 0) + n
    return sorted(rows.values(), key=lambda r: (r.tenant, r.stream))
