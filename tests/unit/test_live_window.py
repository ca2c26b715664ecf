"""The worker's live output: the first delta at once, then what arrives within the window joined.

A provider that hands over one token at a time must not cost a signed message per token, and a
client must still see the first token as soon as it exists and, in the end, exactly the text."""

from __future__ import annotations

import asyncio

from mesh_contracts.v1 import TokenDelta
from mesh_worker.live import Live


class _Mesh:
    def __init__(self) -> None:
        self.sent: list[TokenDelta] = []
        self.counted = 0

    def count(self, name: str) -> None:
        self.counted += 1

    async def emit(self, model: TokenDelta) -> None:
        self.sent.append(model)

    def seen(self) -> list[tuple[str, str]]:
        return [(m.kind, m.text) for m in self.sent]


async def _stream(window_s: float, *words: str) -> tuple[_Mesh, Live]:
    """A call's live output with ``words`` handed over back to back, as a provider's burst."""
    mesh = _Mesh()
    live = Live(mesh, "acme", "t1", "s1", "c1", window_s)  # type: ignore[arg-type]
    for w in words:
        await live.token(w)
    return mesh, live


async def test_a_burst_is_one_delta_after_the_first_and_the_text_is_whole():
    words = [f"w{i} " for i in range(40)]
    mesh, live = await _stream(0.05, *words)
    assert mesh.seen() == [("delta", "w0 ")], "the first token went out at once, before any wait"
    await asyncio.sleep(0.08)
    assert len(mesh.sent) == 2, "the rest of the burst went out as one delta when the window closed"
    await live.end("scripted/x")
    assert [m.kind for m in mesh.sent] == ["delta", "delta", "end"]
    assert "".join(m.text for m in mesh.sent if m.kind == "delta") == "".join(words)
    assert [m.seq for m in mesh.sent] == [0, 1, 2]
    assert mesh.counted == 40, "every provider delta is still counted"


async def test_end_flushes_what_is_held_before_saying_end():
    mesh, live = await _stream(0.02, "a", "b", "c")
    await live.end("m")
    assert mesh.seen() == [("delta", "a"), ("delta", "bc"), ("end", "")]
    await asyncio.sleep(0.06)  # past the window: a flush still pending would have fired
    assert len(mesh.sent) == 3, "nothing after the end"


async def test_a_reset_drops_the_held_text_of_the_failed_attempt():
    mesh, live = await _stream(10.0, "old1", "old2", "old3")
    await live.reset("connection lost")
    await live.token("new")
    await live.end("m")
    assert mesh.seen() == [("delta", "old1"), ("reset", "connection lost"), ("delta", "new"), ("end", "")]


async def test_paced_tokens_each_go_out_and_a_zero_window_sends_every_one():
    mesh = _Mesh()
    live = Live(mesh, "acme", "t1", "s1", "c1", 0.01)  # type: ignore[arg-type]
    for w in ("a", "b", "c"):
        await live.token(w)
        await asyncio.sleep(0.03)  # slower than the window: nothing to join
    assert [m.text for m in mesh.sent] == ["a", "b", "c"]
    mesh0, _ = await _stream(0.0, "a", "b", "c")
    assert [m.text for m in mesh0.sent] == ["a", "b", "c"]
