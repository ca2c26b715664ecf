"""Faster equivalents of nats-py internals that every received message goes through.

nats-py parses each message's header block with ``Client._parse_header_lines``, which tests
every character of every header name with a Python generator (``any(c.isspace() for c in
key)``). A mesh message carries a dozen headers (the envelope's ``Mesh-*``, ``Nats-Msg-Id``,
``traceparent``, and on a republished feed ``Nats-Stream``/``-Sequence``/``-Time-Stamp``...), so
that generator ran ~150 times per message: in a profile of the budget under load it was the
largest single item of pure Python. ``parse_header_lines`` returns exactly what nats-py's does
(``tests/unit/test_wire.py`` holds the two equal on generated header blocks) in half the time.

``install()`` puts it in place for every connection of the process; it is idempotent, and the
library's own function stays available as ``ORIGINAL`` for the equality test.
"""

from __future__ import annotations

from nats.aio.client import Client

_CRLF = b"\r\n"
ORIGINAL = Client.__dict__["_parse_header_lines"]
"""nats-py's own parser (a staticmethod object), as it was before ``install``."""


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """nats-py's header parsing, without a generator per header name.

    A name with whitespace inside it is skipped, as nats-py does: ``key.split() != [key]`` is
    true exactly when some character of a non-empty ``key`` is whitespace by ``str.isspace``
    (the bytes ``strip`` before it leaves ``\\x1c``-``\\x1f`` in place, which ``str.split`` treats
    as whitespace, so those names are skipped too, as the original skips them)."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if key and key.split() != [key]:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def install() -> None:
    """Use ``parse_header_lines`` for every nats-py connection of this process."""
    Client._parse_header_lines = staticmethod(parse_header_lines)  # type: ignore[method-assign]
