"""Planning slots: how many plans this planner makes at once, shared fairly among tenants.

Admission is decided after a submission is fetched, so the planner's submission durable is the
one queue whose backlog per tenant has no bound: a client may publish any number of submissions.
The fair consumer fetches ahead a window of messages and serves tenants in turn, but it can only
serve what it has fetched: a burst larger than the window hides every later submission until
enough of the burst has been handled. An admitted submission used to be handled in place (its plan
is a model call, 200 ms and more with a real model) by one of the few handlers, so a 300-task
burst kept a quiet tenant's next submission out of sight for ~2 s (``bench/bench_admission.py
--latency-ms 200``: 3.1x its quiet latency for the task submitted right after the burst).

Now an admitted submission that finds every planning slot taken waits parked (kept alive, out of
the fetch window: ``mesh_kit.delivery.Park``), so the window goes on past the burst, refusals stay
fast, and a slot that frees goes to the waiting tenant with the fewest plans in progress here,
then in turn; within a tenant, higher priority first, then arrival. One handler more than there
are slots keeps a newly fetched submission from waiting for a handler behind the plans.

The slots are this process's: replicas each have their own, as they have their own handlers.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

GRANT_S = 30.0
"""How long a slot handed to a waiting submission stays its own before it is taken back (the
submission normally asks again within milliseconds; a planner stopping hands it back instead)."""


class PlanningSlots:
    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.busy: dict[tuple[str, str], float] = {}
        """(tenant, task) planning now."""
        self.granted: dict[tuple[str, str], float] = {}
        """(tenant, task) handed a slot that has not asked again yet (and since when)."""
        self._waiting: dict[str, list[tuple[int, int, str, asyncio.Future[None]]]] = {}
        self._order = itertools.count()
        self._turn = itertools.count()
        self._served: dict[str, int] = {}
        """Per tenant, when it was last handed a slot (a counter): ties go to the longest unserved."""

    def _in_use(self, tenant: str | None = None) -> int:
        keys = [*self.busy, *self.granted]
        return len(keys) if tenant is None else sum(1 for t, _ in keys if t == tenant)

    def take(self, tenant: str, task_id: str) -> bool:
        """Start planning now if a slot is this task's or free for it (True), else False."""
        self._lapse()
        key = (tenant, task_id)
        if key in self.busy:
            return True
        if self.granted.pop(key, None) is not None or (self._in_use() < self.slots and not any(self._waiting.values())):
            self.busy[key] = time.monotonic()
            return True
        return False

    async def wait(self, tenant: str, task_id: str, priority: int = 5) -> None:
        """Return once a slot has been handed to this task (it then ``take``s it)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting.setdefault(tenant, []), (-priority, next(self._order), task_id, fut))
        self._hand_over()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.granted.pop((tenant, task_id), None)  # handed over as it was cancelled: pass it on
                self._hand_over()
            raise

    def release(self, tenant: str, task_id: str) -> None:
        """The task's planning is over (planned, failed, or given up): its slot goes to the next."""
        self.busy.pop((tenant, task_id), None)
        self.granted.pop((tenant, task_id), None)
        self._hand_over()

    def unclaimed(self, tenant: str, task_id: str) -> None:
        """A submission of the task was handled without planning here (its task was planned by
        another copy of the submission, ended, or refused): a slot handed to it is passed on.
        Two copies of one submission can wait at once (JetStream redelivered it while it waited
        parked: a cluster node failed and the keepalives were lost); the second one's turn came
        after the first had planned, and its slot stayed taken until the hand-over lapsed."""
        key = (tenant, task_id)
        if key not in self.busy and self.granted.pop(key, None) is not None:
            self._hand_over()

    def waiting(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def _lapse(self) -> None:
        now = time.monotonic()
        for key in [k for k, at in self.granted.items() if now - at > GRANT_S]:
            del self.granted[key]

    def _hand_over(self) -> None:
        self._lapse()
        while self._in_use() < self.slots:
            for tenant in [t for t, w in self._waiting.items() if not w]:
                del self._waiting[tenant]
            for w in self._waiting.values():
                while w and w[0][3].done():  # cancelled while it waited
                    heapq.heappop(w)
            candidates = [t for t, w in self._waiting.items() if w]
            if not candidates:
                return
            tenant = min(candidates, key=lambda t: (self._in_use(t), self._served.get(t, -1)))
            *_, task_id, fut = heapq.heappop(self._waiting[tenant])
            self._served[tenant] = next(self._turn)
            self.granted[(tenant, task_id)] = time.monotonic()
            fut.set_result(None)
