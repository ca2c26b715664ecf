"""Fake model servers on a thread of their own, for tests and benchmarks that run a real mesh.

The services are separate processes that reach the servers over HTTP; the test (or benchmark)
keeps the server objects in reach to set faults and read what they were asked and when.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from mesh_testing.fake_llm import FakeLLMServer

T = TypeVar("T")


class ServerThread:
    """An event loop on a daemon thread that hosts one or more ``FakeLLMServer``s."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-llm", daemon=True)
        self._thread.start()
        self.servers: list[FakeLLMServer] = []

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, **kw: Any) -> FakeLLMServer:
        async def start() -> FakeLLMServer:
            return await FakeLLMServer(**kw).start()

        server = self.run(start())
        self.servers.append(server)
        return server

    def close(self) -> None:
        for s in self.servers:
            self.run(s.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@contextmanager
def fake_llm_servers() -> Iterator[ServerThread]:
    st = ServerThread()
    try:
        yield st
    finally:
        st.close()
