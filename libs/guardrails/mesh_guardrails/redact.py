"""Secret and PII redaction for anything that leaves a process as text: logs, span attributes,
traces, audit records, tool arguments.

Why a local, pattern-based engine (the equivalent of presidio's regex-only recognisers, without
its spaCy-pulling analyzer): it is deterministic, it needs no model, and it is fast enough to
run on every log record. Every match becomes ``[REDACTED:<kind>]``.

Order matters. Credentials run first so that their labels are specific (a NATS creds file is
``nats-creds``, not three unrelated fragments) and so that the generic PII patterns that follow
never see, and half-match, the digits inside a key. Then the PII kinds (e-mail, IBAN with its
mod-97 check, card with Luhn, SSN, phone, IPv4).

Properties callers rely on:

- idempotent: ``redact(redact(x)) == redact(x)`` (labels contain no digits, ``@`` or key
  material, and ``redact`` repeats its passes until nothing changes);
- never raises: an internal failure returns a fixed placeholder rather than the raw text,
  because a redactor that fails open leaks exactly what it was asked to hide;
- it errs on the side of redacting: a trace loses a little detail rather than leak a secret.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

_Repl = str | Callable[[re.Match[str]], str]

# ---------------------------------------------------------------- checksums and validators


def _luhn(digits: str) -> bool:
    total, odd = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if odd:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        odd = not odd
    return total % 10 == 0


# Official IBAN lengths (SWIFT IBAN registry). Knowing the length lets the check pick exactly the
# IBAN out of a longer greedy match ("DE89 3704 0044 0532 0130 00 1234" keeps the trailing number).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29,
    "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def _iban_ok(compact: str) -> bool:
    if not 15 <= len(compact) <= 34 or not compact.isalnum():
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def _iban(m: re.Match[str]) -> str:
    raw = m.group(0)
    # Positions of the alphanumerics in the raw match, so a valid prefix can be cut out of it.
    positions = [i for i, ch in enumerate(raw) if not ch.isspace()]
    compact = "".join(raw[i] for i in positions)
    want = _IBAN_LENGTHS.get(compact[:2])
    if want is None:
        return "[REDACTED:iban]" if _iban_ok(compact) else raw
    if len(compact) < want or not _iban_ok(compact[:want]):
        return raw
    cut = positions[want - 1] + 1
    return "[REDACTED:iban]" + raw[cut:]


def _card(m: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", m.group(0))
    return "[REDACTED:card]" if 13 <= len(digits) <= 19 and _luhn(digits) else m.group(0)


def _phone(m: re.Match[str]) -> str:
    # A phone number in text is written with a leading "+" or grouped with separators. A bare
    # or once-split digit run ("20240517-8842", an epoch timestamp) is an id, not a phone.
    raw = m.group(0)
    grouped = raw.startswith("+") or sum(raw.count(c) for c in " .-()") >= 2
    return "[REDACTED:phone]" if grouped else raw


def _ip(m: re.Match[str]) -> str:
    return "[REDACTED:ip]" if all(int(octet) <= 255 for octet in m.group(0).split(".")) else m.group(0)


def _jwt(m: re.Match[str]) -> str:
    # A NATS JWT is an ordinary JWT signed with an nkey; its header says so. Decoding the header
    # only picks the label, both are redacted.
    header = m.group(0).split(".", 1)[0]
    try:
        decoded = base64.urlsafe_b64decode(header + "=" * (-len(header) % 4))
        alg = str(json.loads(decoded).get("alg", ""))
    except (ValueError, AttributeError):
        alg = ""
    return "[REDACTED:nats-jwt]" if "nkey" in alg else "[REDACTED:jwt]"


def _random_looking(m: re.Match[str]) -> str:
    # "sk-" keys are random: a digit or an upper-case letter is always there. Prose such as
    # "sk-learn-compatible-estimators" has neither and is left alone.
    body = m.group("body")
    return "[REDACTED:api-key]" if re.search(r"[0-9A-Z]", body) else m.group(0)


_API_KEY_NAMES = re.compile(r"api[_-]?key|apikey", re.IGNORECASE)


def _assignment(m: re.Match[str]) -> str:
    """``password=hunter2`` -> ``password=[REDACTED:secret]``: the name stays, it says what was there."""
    value = m.group("v1") or m.group("v2") or m.group("v3") or ""
    if not value or value.startswith("[REDACTED:"):
        return m.group(0)
    if m.group("v3") and ":" in m.group("sep") and "=" not in m.group("sep"):
        # "token: it expires in an hour" is prose; "token: 3fa9c1d2" or "password: hunter2" is not.
        # With a colon and no quotes, a value counts only if it has a digit or symbol or is long.
        if len(value) < 12 and value.isalpha():
            return m.group(0)
    kind = "api-key" if _API_KEY_NAMES.search(m.group("name")) else "secret"
    start, end = m.span("v1") if m.group("v1") else m.span("v2") if m.group("v2") else m.span("v3")
    base = m.start(0)
    whole = m.group(0)
    return whole[: start - base] + f"[REDACTED:{kind}]" + whole[end - base :]


# ---------------------------------------------------------------- the patterns, in order

_B32 = "A-Z2-7"

# Labels a pattern's replacement may choose besides its own kind.
_ALSO = {"jwt": ("nats-jwt",)}

_PATTERNS: tuple[tuple[str, re.Pattern[str], _Repl], ...] = (
    # A whole NATS creds file (JWT + seed between their banners), also JSON-escaped ("\n").
    (
        "nats-creds",
        re.compile(r"-----BEGIN NATS USER JWT-----[\s\S]*?------END USER NKEY SEED------"),
        "[REDACTED:nats-creds]",
    ),
    # PEM private keys (RSA, EC, OPENSSH, ENCRYPTED, PKCS#8, USER NKEY SEED). Without an END marker
    # (a log line cut short) the base64 body that follows is taken instead.
    (
        "private-key",
        re.compile(
            r"-----BEGIN ((?:[A-Z0-9]+ )*(?:PRIVATE KEY|NKEY SEED))-----"
            r"(?:[\s\S]*?-{5,6}END (?:[A-Z0-9]+ )*(?:PRIVATE KEY|NKEY SEED)-{5,6}|[A-Za-z0-9+/=\s\\:,-]*)"
        ),
        "[REDACTED:private-key]",
    ),
    # scheme://user:password@host (nats, redis, postgres, amqp, http...): only the password goes.
    # Runs before e-mail, which would otherwise eat "password@host.example".
    (
        "password",
        re.compile(r"(?P<pre>\b[a-zA-Z][a-zA-Z0-9+.-]{1,15}://[^\s:/@?#\[\]]*:)(?P<pw>[^\s/?#]+)(?=@[^\s@/?#]+)"),
        r"\g<pre>[REDACTED:password]",
    ),
    ("jwt", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"), _jwt),
    # NATS nkey seed: 'S' + the key type (User, Account, Operator, server N, Cluster, ...) + 56
    # base32 chars = 58 chars. An encoded nkey private key is 'P' + 107 base32 chars.
    (
        "nats-seed",
        re.compile(rf"(?<![A-Za-z0-9])(?:S[UAONCPX][{_B32}]{{56}}|P[{_B32}]{{107}})(?![A-Za-z0-9])"),
        "[REDACTED:nats-seed]",
    ),
    # Provider API keys, each with its documented prefix.
    (
        "api-key",
        re.compile(r"(?<![\w-])sk-(?:ant-|proj-|svcacct-|admin-)?(?P<body>[A-Za-z0-9_-]{20,})"),
        _random_looking,
    ),
    ("api-key", re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b"), "[REDACTED:api-key]"),
    (
        "api-key",
        re.compile(r"(?i)(?P<pre>aws_?secret_?access_?key[\"']?\s*[:=]\s*[\"']?)[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])"),
        r"\g<pre>[REDACTED:api-key]",
    ),
    ("api-key", re.compile(r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,})\b"), "[REDACTED:api-key]"),
    ("api-key", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}"), "[REDACTED:api-key]"),
    ("api-key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}(?![0-9A-Za-z_-])"), "[REDACTED:api-key]"),
    ("api-key", re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[0-9A-Za-z]{16,}\b"), "[REDACTED:api-key]"),
    # Bearer tokens, HTTP Basic credentials, and the older generic "pk-"/"rk-" secrets.
    (
        "secret",
        re.compile(
            r"\bBearer\s+[A-Za-z0-9._~+/=-]{16,}"
            r"|(?<![\w-])(?:pk|rk)-[A-Za-z0-9_-]{16,}\b"
        ),
        "[REDACTED:secret]",
    ),
    (
        "secret",
        re.compile(r"(?i)(?P<pre>\bauthorization[\"']?\s*[:=]\s*[\"']?basic\s+)[A-Za-z0-9+/=]{8,}"),
        r"\g<pre>[REDACTED:secret]",
    ),
    # name=value / name: value / "name": "value" where the name says it is a credential
    # (OPENAI_API_KEY=..., MESH_REDIS_PASSWORD=..., "client_secret": "...", x-api-key: ...).
    # The lookbehind anchors the name at the start of an identifier: linear time on long runs.
    (
        "secret",
        re.compile(
            r"(?i)(?<![\w.-])(?P<name>[\w.-]{0,40}?(?:api[_-]?key|apikey|token|secret|passw(?:or)?d|passphrase|pwd))"
            r"(?P<sep>\\?[\"']?\s*[:=]\s*)"
            r"(?:\\?\"(?P<v1>[^\"\\\n]{1,512})|\\?'(?P<v2>[^'\\\n]{1,512})|(?P<v3>[^\s\"'\\,;&}\])]{1,512}))"
        ),
        _assignment,
    ),
    # PII. The lookbehind on e-mail makes a match start only at the beginning of a run (the old
    # pattern retried at every character of a long base64 blob: quadratic).
    ("email", re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[REDACTED:email]"),
    ("iban", re.compile(r"\b[A-Z]{2}\d{2}(?:\s?[A-Z0-9]{4}){3,7}(?:\s?[A-Z0-9]{1,3})?\b"), _iban),
    ("card", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), _card),
    ("ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), "[REDACTED:ssn]"),
    # IPv4 before phone: a dotted quad ("169.254.169.254") also has the shape of a grouped phone number
    ("ip", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"), _ip),
    ("phone", re.compile(r"(?<![\w+-])\+?\d{1,3}[ .-]?\(?\d{2,4}\)?[ .-]?\d{3,4}[ .-]?\d{3,4}\b"), _phone),
)

KINDS: tuple[str, ...] = tuple(dict.fromkeys(k for kind, _, _ in _PATTERNS for k in (kind, *_ALSO.get(kind, ()))))
"""Every label ``redact`` can produce, in the order the patterns run."""

_UNREDACTABLE = "[REDACTED:unredactable]"
_MAX_PASSES = 4


_PII = frozenset({"email", "iban", "card", "ssn", "phone", "ip"})
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]{1,15}://[^\s<>\"'`]+")


def _inside_urls(repl: _Repl) -> _Repl:
    """``repl`` that leaves a match alone when it lies inside a URL of the text being rewritten."""

    def sub(m: re.Match[str]) -> str:
        for u in _URL.finditer(m.string):
            if u.start() <= m.start() and m.end() <= u.end():
                return m.group(0)
        return repl(m) if callable(repl) else m.expand(repl)

    return sub


def _one_pass(text: str, keep: frozenset[str]) -> str:
    for kind, pattern, repl in _PATTERNS:
        if kind in keep:
            continue
        if "url" in keep and kind in _PII and "://" in text:
            text = pattern.sub(_inside_urls(repl), text)
        else:
            text = pattern.sub(repl, text)
    return text


def redact(value: object, *, keep: Iterable[str] = ()) -> str:
    """``text`` with every secret and PII match replaced by ``[REDACTED:<kind>]``.

    ``keep`` names kinds to leave as they are, for a reader who must see them: an approver
    deciding on ``send_email`` needs the recipient (``keep=("email",)``). ``"url"`` keeps the
    PII-looking parts of URLs (a host's IP address, an address in a ``mailto:``) while the
    credentials in them (a password in the userinfo, a token in the query) are still redacted.

    A pass can, rarely, expose a new match (a card number cut out of a longer digit run), so
    passes repeat until the text is stable; almost every text needs one pass, or two when it
    had something to redact.
    """
    try:
        text = value if isinstance(value, str) else str(value)  # whatever a caller hands us
        kept = frozenset(keep)
        for _ in range(_MAX_PASSES):
            out = _one_pass(text, kept)
            if out == text:
                return out
            text = out
        return text
    except Exception:  # noqa: BLE001 - fail closed: never hand back text we could not redact
        return _UNREDACTABLE


def find(value: object) -> list[tuple[str, str]]:
    """``(kind, value)`` of every secret and PII match ``redact`` would replace, in the order
    the patterns run (each pattern sees the text with the earlier kinds already redacted, as in
    ``redact``, so a dotted quad is an IP and not also a phone number)."""
    found: list[tuple[str, str]] = []
    text = value if isinstance(value, str) else str(value)
    for kind, pattern, repl in _PATTERNS:

        def sub(m: re.Match[str], kind: str = kind, repl: _Repl = repl) -> str:
            out = repl(m) if callable(repl) else m.expand(repl)
            if out != m.group(0):
                found.append((kind, m.group(0)))
            return out

        text = pattern.sub(sub, text)
    return found


# Keys whose value is a credential whatever it looks like ({"password": "hunter2"}).
_SENSITIVE_KEY = re.compile(
    r"(?i)(?:passw(?:or)?d|passphrase|secret|token|api[_-]?key|apikey|private[_-]?key|credentials?|"
    r"authorization|cookie|pwd)$"
)


def redact_value(obj: Any, *, keep: Iterable[str] = (), _seen: frozenset[int] = frozenset()) -> Any:
    """A copy of ``obj`` with every string inside dicts, lists, tuples and sets redacted.

    For span attributes, audit records and tool arguments. A value under a credential-named key
    (``password``, ``api_key``, ``client_secret``, ``x-auth-token``...) is replaced whole, since a
    short password matches no pattern. Other scalars (numbers, bools, None) are returned as they
    are; a cycle is cut with a placeholder rather than recursing forever. ``keep`` is passed to
    ``redact``. Never raises.
    """
    try:
        keep = tuple(keep)
        if isinstance(obj, str):
            return redact(obj, keep=keep)
        if isinstance(obj, bytes | bytearray):
            return redact(bytes(obj).decode("utf-8", "replace"), keep=keep)
        if isinstance(obj, Mapping | list | tuple | set | frozenset):
            if id(obj) in _seen:
                return "[REDACTED:cycle]"
            seen = _seen | {id(obj)}
            if isinstance(obj, Mapping):
                out: dict[Any, Any] = {}
                for key, value in obj.items():
                    new_key = redact(key, keep=keep) if isinstance(key, str) else key
                    while new_key in out:  # two keys redacted to the same label: keep both
                        new_key = f"{new_key}'"
                    if isinstance(key, str) and _SENSITIVE_KEY.search(key) and _is_scalar_secret(value):
                        out[new_key] = "[REDACTED:secret]"
                    else:
                        out[new_key] = redact_value(value, keep=keep, _seen=seen)
                return out
            items = [redact_value(v, keep=keep, _seen=seen) for v in obj]
            if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple keeps its type
                return type(obj)(*items)
            if isinstance(obj, list | tuple):
                return type(obj)(items) if type(obj) in (list, tuple) else items
            return frozenset(items) if isinstance(obj, frozenset) else set(items)
        return obj
    except Exception:  # noqa: BLE001 - fail closed, as redact does
        return _UNREDACTABLE


def _is_scalar_secret(value: Any) -> bool:
    # Only a present, non-boolean scalar is a secret: {"token": None} or {"password": False}
    # carry nothing, and a nested dict under "credentials" is walked rather than flattened.
    return isinstance(value, str | int | float | bytes) and not isinstance(value, bool) and value != ""
