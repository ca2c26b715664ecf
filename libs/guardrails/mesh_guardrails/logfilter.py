"""Redaction of every log record before any handler writes it.

Why a handler filter: log calls are everywhere (ours and our dependencies'), and a secret can
arrive through the message, its ``%`` arguments, an exception (an HTTP client's error quoting the
request with its ``Authorization`` header, a connection URL with a password) or a stack. A filter
on the handlers sees every record that reaches them, whichever logger it came from; a filter on
a logger would only see records logged on that very logger, not those propagated from children.

The filter formats the message once, redacts it, and stores the result as the record's message
with no arguments left, so every handler and formatter after it sees only the redacted text. An
exception is formatted into ``exc_text`` (redacted) and ``exc_info`` cleared, so no formatter can
render the raw traceback again.
"""

from __future__ import annotations

import logging
from typing import Any

from mesh_guardrails.redact import redact, redact_value

# Attributes every LogRecord has; anything else was passed with ``extra=`` and may be rendered
# by a formatter (``%(user)s``), so it is redacted too.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_FORMATTER = logging.Formatter()


class RedactingFilter(logging.Filter):
    """Replaces a record's message, arguments, exception and stack text with their redaction."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not hide the record, nor leak it raw
            message = f"{record.msg!r} {record.args!r}"
        record.msg = redact(message)
        record.args = None  # formatted once, above; "%" in the redacted text is not re-interpreted
        if record.exc_info:
            if not record.exc_text:
                record.exc_text = _FORMATTER.formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and isinstance(value, str | bytes | dict | list | tuple):
                record.__dict__[key] = redact_value(value)
        return True


def install(handler_or_logger: logging.Handler | logging.Logger | None = None) -> RedactingFilter:
    """Attach one ``RedactingFilter`` to a handler, or to every handler of a logger (the root
    logger by default). Idempotent: a handler that already has one is left as it is."""
    target: Any = handler_or_logger if handler_or_logger is not None else logging.getLogger()
    handlers = [target] if isinstance(target, logging.Handler) else list(target.handlers)
    installed = RedactingFilter()
    for handler in handlers:
        existing = next((f for f in handler.filters if isinstance(f, RedactingFilter)), None)
        if existing is None:
            handler.addFilter(installed)
    return installed
