"""PII redaction for anything that leaves a process as text: logs, span attributes, traces.

Pattern-based and deterministic: e-mail addresses, phone numbers, payment card numbers
(Luhn-checked), IBANs, US social security numbers, IPv4 addresses and credential-looking
tokens (``sk-...``, bearer tokens, long hex/base64 secrets) become ``[REDACTED:<kind>]``.
It errs on the side of redacting; a trace loses a little detail rather than leak a secret.
"""

from __future__ import annotations

import re

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("email", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    ("secret", re.compile(r"\b(?:sk|pk|rk|xox[abp])-[A-Za-z0-9_-]{16,}\b|\bBearer\s+[A-Za-z0-9._~+/=-]{16,}")),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]{4}){3,7}(?:\s?[A-Z0-9]{1,3})?\b")),
    ("card", re.compile(r"\b(?:\d[ -]?){12,18}\d\b")),
    ("ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("phone", re.compile(r"(?<![\w+])\+?\d{1,3}[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}\b")),
    ("ip", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")),
)


def _luhn(digits: str) -> bool:
    total, odd = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if odd:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        odd = not odd
    return total % 10 == 0


def redact(text: str) -> str:
    """``text`` with every PII match replaced by ``[REDACTED:<kind>]``."""
    for kind, pattern in _PATTERNS:
        if kind == "card":

            def card(m: re.Match[str]) -> str:
                digits = re.sub(r"\D", "", m.group(0))
                return "[REDACTED:card]" if 13 <= len(digits) <= 19 and _luhn(digits) else m.group(0)

            text = pattern.sub(card, text)
        else:
            text = pattern.sub(f"[REDACTED:{kind}]", text)
    return text
