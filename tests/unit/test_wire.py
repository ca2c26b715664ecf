"""mesh_kit.wire: the header parser every received message goes through returns exactly what
nats-py's own returns, for the mesh's real header blocks and for generated hostile ones."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from mesh_kit import wire

pytestmark = pytest.mark.unit

ORIGINAL = wire.ORIGINAL.__func__

REAL = (
    b"Mesh-Schema: usage.recorded/v1\r\nMesh-Tenant: acme\r\nMesh-Task: t-463d64383d6f\r\n"
    b"Mesh-Identity: eyJhbGciOiJFZERTQSJ9.eyJpc3MiOiJ3b3JrZXIifQ.c2ln\r\nNats-Msg-Id: usage.recorded:acme:t-1:s1\r\n"
    b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\r\nNats-Stream: USAGE\r\n"
    b"Nats-Sequence: 1234\r\nNats-Time-Stamp: 2026-11-25T07:40:41.123456789Z\r\n\r\n"
)

# Header-ish lines: names and values from an alphabet rich in what trips parsers (every ASCII
# whitespace, the separators, \x1c-\x1f which str.isspace calls whitespace, non-ASCII, NUL).
_TRICKY = st.sampled_from(
    [b" ", b"\t", b"\n", b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x1f", b":", b"\x00", b"\xc3\xa9", b"\xff", b"\x85"]
)
_TEXT = st.lists(st.one_of(_TRICKY, st.binary(min_size=1, max_size=4)), max_size=8).map(b"".join)
_LINE = st.one_of(_TEXT, st.tuples(_TEXT, _TEXT).map(lambda kv: kv[0] + b":" + kv[1]))


def test_the_mesh_headers_parse_as_nats_py_parses_them():
    assert wire.parse_header_lines(REAL) == ORIGINAL(REAL)
    assert wire.parse_header_lines(REAL)["Mesh-Tenant"] == "acme"


@settings(max_examples=1500, deadline=None)
@given(st.lists(_LINE, max_size=10).map(b"\r\n".join))
@example(b"\x1cName: v\r\nok: 1")  # \x1c survives bytes.strip and is whitespace to str
@example(b": empty name\r\nA B: inner space\r\nA\tB: tab")
@example(b"dup: 1\r\ndup: 2\r\n\r\n")
@example(b"bad\xffname: x\r\nname: \xff\xfe")
def test_any_header_block_parses_as_nats_py_parses_it(raw):
    assert wire.parse_header_lines(raw) == ORIGINAL(raw)


def test_install_puts_it_on_every_connection():
    wire.install()
    wire.install()  # idempotent
    assert Client._parse_header_lines is wire.parse_header_lines
    assert Client._parse_header_lines(REAL) == ORIGINAL(REAL)
