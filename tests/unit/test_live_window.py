"""The worker's live output: the first delta at once, then what arrives within the window joined.

A provider that hands over one token at a time must not cost a signed message per token, and a
client must still see the first token as soon as it exists and, in the end, exactly the text."""

from __future__ import annotations

import asyncio

from mesh_contracts.v1 import TokenDelta
from mesh_worker.service import _Live


class _Mesh:
    def __init__(self) -> None:
        self.sent: list[tuple[float, TokenDelta]] = []
        self.counted = 0

    def count(self, name: str) -> None:
        self.counted += 1

    async def emit(self, model: TokenDelta) -> None:
        self.sent.append((asyncio.get_running_loop().time(), model))


def _live(mesh: _Mesh, window_s: float) -> _Live:
    return _Live(mesh, "acme", "t1", "s1", "c1", window_s)  # type: ignore[arg-type]


async def test_a_burst_is_one_delta_after_the_first_and_the_text_is_whole():
    mesh = _Mesh()
    live = _live(mesh, 0.05)
    words = [f"w{i} " for i in range(40)]
    t0 = asyncio.get_running_loop().time()
    for w in words:
        await live.token(w)
    assert [m.text for _, m in mesh.sent] == ["w0 "], "the first token goes out at once"
    assert mesh.sent[0][0] - t0 < 0.02
    await asyncio.sleep(0.08)
    assert len(mesh.sent) == 2, "the rest of the burst went out as one delta when the window closed"
    await live.end("scripted/x")
    kinds = [m.kind for _, m in mesh.sent]
    assert kinds == ["delta", "delta", "end"]
    assert "".join(m.text for _, m in mesh.sent if m.kind == "delta") == "".join(words)
    assert [m.seq for _, m in mesh.sent] == [0, 1, 2]
    assert mesh.counted == 40, "every provider delta is still counted"


async def test_end_flushes_what_is_held_before_saying_end():
    mesh = _Mesh()
    live = _live(mesh, 10.0)
    for w in ("a", "b", "c"):
        await live.token(w)
    await live.end("m")
    assert [(m.kind, m.text) for _, m in mesh.sent] == [("delta", "a"), ("delta", "bc"), ("end", "")]
    await asyncio.sleep(0.01)
    assert len(mesh.sent) == 3, "no late flush after the end"


async def test_a_reset_drops_the_held_text_of_the_failed_attempt():
    mesh = _Mesh()
    live = _live(mesh, 10.0)
    for w in ("old1", "old2", "old3"):
        await live.token(w)
    await live.reset("connection lost")
    await live.token("new")
    await live.end("m")
    texts = [(m.kind, m.text) for _, m in mesh.sent]
    assert texts == [("delta", "old1"), ("reset", "connection lost"), ("delta", "new"), ("end", "")]


async def test_paced_tokens_each_go_out_and_a_zero_window_sends_every_one():
    mesh = _Mesh()
    live = _live(mesh, 0.01)
    for w in ("a", "b", "c"):
        await live.token(w)
        await asyncio.sleep(0.03)  # slower than the window: nothing to join
    assert [m.text for _, m in mesh.sent] == ["a", "b", "c"]
    mesh0 = _Mesh()
    live0 = _live(mesh0, 0.0)
    for w in ("a", "b", "c"):
        await live0.token(w)
    assert [m.text for _, m in mesh0.sent] == ["a", "b", "c"]
