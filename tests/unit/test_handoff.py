"""The hand-off journal (``mesh_host.handoff``): what a successor reads, when it may hand back,
one live writer per file, and a file that stays small."""

from __future__ import annotations

import os

from mesh_host.handoff import COMPACT_BYTES, Journal, Predecessor, due, read

ACK = 4.0


def _reply(seq: int, delivered: int = 1) -> str:
    return f"$JS.ACK.TASKS.worker-steps.{delivered}.{seq}.{seq}.1795783267631200884.0"


def test_the_successor_reads_what_was_held_at_the_end(tmp_path):
    path = str(tmp_path / "w.held")
    j = Journal(path, ACK)
    assert j.take_over() == [] and j.open
    for seq in (1, 2, 3):
        j.hold("TASKS", "worker-steps", seq, _reply(seq))
    j.release("TASKS", "worker-steps", 2)
    j.hold("TASKS", "worker-steps", 3, _reply(3, delivered=2))  # a newer delivery of one it holds
    j.hold("STEPS", "worker-steps", 2, _reply(2))  # the same sequence in another stream is another message
    j.alive()
    pred = read(path)
    assert sorted(pred.held) == sorted([_reply(1), _reply(3, delivered=2), _reply(2)])
    assert pred.alive_s is not None and 0 <= pred.alive_s < 1


def test_it_hands_back_only_within_half_an_ack_wait_of_its_predecessors_last_sign_of_life():
    held = [_reply(1)]
    assert due(Predecessor(held, 0.3), ACK) == held
    assert due(Predecessor(held, ACK / 2 - 0.01), ACK) == held
    assert due(Predecessor(held, ACK / 2), ACK) == [], "the server may have redelivered them already"
    assert due(Predecessor(held, None), ACK) == [], "never said it was alive: nothing"
    assert due(Predecessor([], 0.1), ACK) == []


def test_a_late_successor_hands_back_nothing_and_starts_empty(tmp_path):
    path = str(tmp_path / "w.held")
    with open(path, "w") as f:
        f.write(f"+ TASKS d 7 {_reply(7)}\n@ 1000.0\n")  # alive long ago
    j = Journal(path, ACK)
    assert j.take_over() == []
    assert read(path).held == [], "what it could not hand back is not carried on"
    j.close()


def test_a_cut_short_line_is_skipped(tmp_path):
    path = str(tmp_path / "w.held")
    with open(path, "w") as f:
        f.write(f"+ TASKS d 7 {_reply(7)}\n- TASKS d\n+ TASKS d 8 $JS.AC")
    pred = read(path)
    assert pred.held == [_reply(7)]


def test_one_live_process_per_file(tmp_path):
    path = str(tmp_path / "w.held")
    first = Journal(path, ACK)
    first.take_over()
    first.hold("TASKS", "d", 1, _reply(1))
    first.alive()
    second = Journal(path, ACK)
    assert second.take_over() == [], "the first is alive: its messages are not the second's to hand back"
    assert not second.open
    second.hold("TASKS", "d", 2, _reply(2))  # keeps no journal: writes nothing
    assert read(path).held == [_reply(1)]
    first.close()
    assert read(path).held == [] and os.path.getsize(path) == 0, "a clean stop leaves nothing held"


def test_the_file_stays_small(tmp_path):
    path = str(tmp_path / "w.held")
    j = Journal(path, ACK)
    j.take_over()
    j.hold("TASKS", "d", 1, _reply(1))  # one held throughout: the file is never emptied by a release
    for seq in range(2, 20_000):
        j.hold("TASKS", "d", seq, _reply(seq))
        j.release("TASKS", "d", seq)
    assert os.path.getsize(path) <= COMPACT_BYTES + 200
    assert read(path).held == [_reply(1)]
    j.close()


def test_an_idle_process_keeps_a_small_file(tmp_path, monkeypatch):
    """Nothing held, a stamp each round: the file is that one stamp, not every stamp so far."""
    path = str(tmp_path / "w.held")
    j = Journal(path, ACK)
    j.take_over()
    clock = [1_000_000.0]
    monkeypatch.setattr("mesh_host.handoff.time.time", lambda: clock[0])
    for _ in range(10_000):  # about 1.4 hours of rounds at ack_wait / 8
        clock[0] += ACK / 8
        j.alive()
    assert os.path.getsize(path) < 100
    assert read(path, now=clock[0]).alive_s == 0.0
    j.hold("TASKS", "d", 1, _reply(1))  # one held throughout: stamps are appended, then compacted
    for _ in range(20_000):
        clock[0] += ACK / 8
        j.alive()
    assert os.path.getsize(path) <= COMPACT_BYTES + 200
    assert read(path, now=clock[0]).held == [_reply(1)]
    j.close()
