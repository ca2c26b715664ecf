"""Where an effect lands, and whether the tenant's goal chose it.

A write or external call in a step that has read untrusted content may run without a human
only when the arguments that decide where its effect lands (an email's recipient, a URL) were
chosen by the tenant, not by text the model read. "Chosen" is decided here, by parsing:

- **Whole values, real parsers.** Addresses are parsed and normalised with ``email-validator``
  (``ops@acme.com`` is not ``ops@acme.com.au``, and an address with a zero-width character or a
  Cyrillic letter in it is another address); URLs with ``urllib.parse`` and IDNA (scheme, host,
  port, path and query compared whole: ``https://docs.acme.co`` is not ``https://docs.acme.com.au``).
- **In the argument's role.** An address counts as a recipient only where the goal asks for
  mail to go to it ("email the answer to ops@acme.com", "cc ops@acme.com", "notify
  ops@acme.com"); "summarise the complaint from joe@client.com" names joe as a subject, not a
  recipient. A URL counts only where the goal asks for it to be opened ("fetch ...", "read the
  page at ..."). A bare domain the goal asks to open ("anything on docs.acme.com.au") offers every
  URL on that host or below it, without a query, unless the domain is a public suffix (the
  Public Suffix List: naming ``github.io`` or ``com.au`` offers nothing).

Everything not offered this way is the model's choice, which an injected instruction may have
made. The parsers are the oracle; the role cues are deliberately few (a missed phrasing costs a
human decision, never an effect).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal
from urllib.parse import urlsplit

import idna
from email_validator import EmailNotValidError, validate_email

Role = Literal["recipient", "url", "value"]

# Roles of arguments by name, for tools that list trusted arguments without naming a role.
_ROLE_BY_NAME: dict[str, Role] = {
    **dict.fromkeys(("to", "cc", "bcc", "recipient", "recipients", "email", "address"), "recipient"),
    **dict.fromkeys(("url", "uri", "href", "link", "endpoint", "page"), "url"),
}

# Imperative verbs that send something to whoever follows them ("email ops@x", "cc ops@x") or
# follows their "to" ("send the summary to ops@x", "reply to joe@x"). Past forms ("sent to",
# "emailed by") describe, they do not ask.
SEND_VERBS = frozenset(
    "email e-mail mail send forward reply write deliver copy cc bcc notify message ping alert inform tell "
    "share return submit report escalate".split()
)
_TO_WORDS = frozenset({"to", "cc", "bcc"})
# Verbs that open a URL ("fetch https://...", "summarise https://...") and the nouns and
# prepositions that stand between such a verb and its URL ("read the page at https://...").
OPEN_VERBS = frozenset(
    "fetch open read get visit load browse download check see view summarise summarize crawl scrape review "
    "consult use query look follow retrieve pull".split()
)
_OPEN_LINKS = frozenset("at on from of page site website url document doc docs article file feed endpoint".split())
_LIST_GLUE = frozenset({"and", "or", "&", "/", "also", "plus"})

_ADDRESS = re.compile(r"[^\s<>()\[\]{},;:\"'`]+@[^\s<>()\[\]{},;:\"'`]+")
_URL = re.compile(r"(?i)\bhttps?://[^\s<>\"'`]+")
_DOMAIN = re.compile(r"(?i)(?<![\w@./-])((?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63})(?![\w@/-])")
_WORD = re.compile(r"[^\W_]+(?:[-'][^\W_]+)*|[&/]")
_CLAUSE_END = re.compile(r"[.!?;](?=\s|$)|\n")


@dataclass(frozen=True)
class Url:
    """A URL reduced to what decides where a request goes and what it carries."""

    scheme: str
    host: str
    """Lower-case ASCII (IDNA) host, or an IP literal."""
    port: int
    path: str
    query: str
    userinfo: bool

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}" + (f"?{self.query}" if self.query else "")


def _strip_trailing(text: str) -> str:
    """A URL or address at the end of a sentence: the punctuation after it is prose."""
    while text and text[-1] in ".,;:!?)]}'\"":
        text = text[:-1]
    return text


def parse_address(value: str) -> str | None:
    """The normalised address (case-folded, NFC), or None if ``value`` is not one whole address."""
    if not isinstance(value, str) or len(value) > 320:
        return None
    try:
        parsed = validate_email(
            value.strip(), check_deliverability=False, test_environment=True, allow_smtputf8=True
        )  # test_environment: ``.test`` addresses parse (the suites use them); nothing is looked up
    except EmailNotValidError:
        return None
    return unicodedata.normalize("NFC", parsed.normalized).casefold()


def parse_url(value: str) -> Url | None:
    """The URL's parts, or None unless ``value`` is one whole http(s) URL with a valid host."""
    if not isinstance(value, str) or len(value) > 4000 or any(c.isspace() for c in value):
        return None
    try:
        parts = urlsplit(value)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        return None
    if not _is_ip(host):
        try:
            host = idna.encode(host.rstrip("."), uts46=True).decode("ascii").lower()
        except idna.IDNAError:
            return None
    return Url(
        scheme=scheme,
        host=host,
        port=port or (443 if scheme == "https" else 80),
        path=parts.path or "/",
        query=parts.query,
        userinfo="@" in parts.netloc,
    )


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


@lru_cache(maxsize=1)
def _psl() -> Any:
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def registrable(host: str) -> str | None:
    """The registrable domain of ``host`` (eTLD+1 by the Public Suffix List): ``docs.acme.com.au``
    -> ``acme.com.au``; ``alice.github.io`` -> ``alice.github.io``; None for a public suffix
    itself (``com.au``, ``github.io``) and for IP addresses."""
    if _is_ip(host):
        return None
    found: str | None = _psl().privatesuffix(host.lower().rstrip("."))
    return found


def within(host: str, domain: str) -> bool:
    """``host`` is ``domain`` or below it, label by label (``docs.acme.com.au`` is within
    ``acme.com.au``; ``acme.com.au.evil.com`` and ``evilacme.com.au`` are not)."""
    return host == domain or host.endswith("." + domain)


@dataclass
class Offers:
    """What a goal offers, by role."""

    recipients: set[str] = field(default_factory=set)
    urls: set[Url] = field(default_factory=set)
    sites: set[str] = field(default_factory=set)
    """Bare domains the goal asks to open (never a public suffix)."""
    text: str = ""
    """The goal, NFC-normalised and case-folded, for whole-value matches of other arguments."""

    def offers(self, role: Role, value: Any) -> bool:
        """Whether ``value`` (a string, or a list of strings: every one must be offered) is offered
        by the goal in ``role``."""
        if isinstance(value, (list, tuple)):
            return bool(value) and all(self.offers(role, v) for v in value)
        if not isinstance(value, str) or not value.strip():
            return False
        if role == "recipient":
            address = parse_address(value)
            return address is not None and address in self.recipients
        if role == "url":
            url = parse_url(value)
            if url is None or url.userinfo:
                return False
            if _url_key(url) in {_url_key(u) for u in self.urls}:
                return True
            return not url.query and any(within(url.host, site) for site in self.sites)
        wanted = unicodedata.normalize("NFC", value.strip()).casefold()
        return bool(re.search(rf"(?<![\w@./-]){re.escape(wanted)}(?![\w@/-]|\.\w)", self.text))


def _url_key(u: Url) -> tuple[str, str, int, str, str]:
    return (u.scheme, u.host, u.port, u.path, u.query)


def role_of(arg: str) -> tuple[str, Role]:
    """``"to"`` -> ("to", "recipient"); ``"target:url"`` -> ("target", "url"); unknown names are
    plain values."""
    name, _, role = arg.partition(":")
    if role:
        if role not in ("recipient", "url", "value"):
            raise ValueError(f"unknown argument role {role!r} (recipient, url or value)")
        return name, role  # type: ignore[return-value]
    return name, _ROLE_BY_NAME.get(name.lower(), "value")


def _clause_before(text: str, start: int) -> str:
    """The text of the clause that ends where a value starts (back to the last sentence end)."""
    head = text[:start]
    ends = list(_CLAUSE_END.finditer(head))
    return head[ends[-1].end() :] if ends else head


def _words(clause: str, values: re.Pattern[str]) -> list[str]:
    """The clause's words, lower-case, with other values of the same kind (a list of addresses)
    and list glue removed from its end, so the word before a list is the list's word."""
    words = [w.lower() for w in _WORD.findall(values.sub(" ", clause))]
    while words and words[-1] in _LIST_GLUE:
        words.pop()
    return words


_DETERMINERS = frozenset(
    "the a an this that these those his her their our your my its each every any some which whose no".split()
)
_NEGATIONS = frozenset("not don't dont never avoid without".split())
_CONJUNCTIONS = frozenset("but and or then".split())


def _is_verb(words: list[str], i: int, verbs: frozenset[str]) -> bool:
    """``words[i]`` is one of ``verbs`` used as an imperative: not a noun ("the email sent to
    ..."), not negated ("don't open ...", "never email ...")."""
    if words[i] not in verbs:
        return False
    if i > 0 and words[i - 1] in _DETERMINERS:
        return False
    for w in reversed(words[max(0, i - 3) : i]):
        if w in _CONJUNCTIONS:  # "don't open X but fetch Y": the negation is another clause's
            break
        if w in _NEGATIONS or w.endswith("n't"):
            return False
    return True


def _asks_to_send(clause: str) -> bool:
    words = _words(clause, _ADDRESS)
    if not words:
        return False
    if _is_verb(words, len(words) - 1, SEND_VERBS):  # "email ops@x", "cc ops@x"
        return True
    # "send the answer to ops@x", "reply to joe@x"
    return words[-1] in _TO_WORDS and any(_is_verb(words, i, SEND_VERBS) for i in range(len(words) - 1))


def _asks_to_open(clause: str) -> bool:
    words = _words(clause, _URL)
    if not words:
        return False
    if _is_verb(words, len(words) - 1, OPEN_VERBS):  # "fetch https://..."
        return True
    # "read the page at https://...", "summarise the article on docs.acme.com": a linking word,
    # with an opening verb earlier in the clause.
    return words[-1] in _OPEN_LINKS and any(_is_verb(words, i, OPEN_VERBS) for i in range(len(words) - 1))


def offers(goal: str) -> Offers:
    """Parse what the tenant's goal offers: recipients it asks to mail, URLs and sites it asks to open."""
    text = unicodedata.normalize("NFC", goal or "")
    out = Offers(text=text.casefold())
    taken: list[tuple[int, int]] = []
    for m in _URL.finditer(text):
        raw = _strip_trailing(m.group(0))
        taken.append((m.start(), m.start() + len(raw)))
        url = parse_url(raw)
        if url is not None and not url.userinfo and _asks_to_open(_clause_before(text, m.start())):
            out.urls.add(url)
    for m in _ADDRESS.finditer(text):
        if any(a <= m.start() < b for a, b in taken):
            continue  # an "@" inside a URL
        raw = _strip_trailing(m.group(0))
        end = m.start() + len(raw)
        taken.append((m.start(), end))
        if text[end : end + 2] in ("'s", "\u2019s"):  # "email joe@x's complaint to ...": a subject
            continue
        address = parse_address(raw)
        if address is not None and _asks_to_send(_clause_before(text, m.start())):
            out.recipients.add(address)
    for m in _DOMAIN.finditer(text):
        if any(a <= m.start() < b for a, b in taken):
            continue
        host = m.group(1).lower()
        if registrable(host) is None:  # a public suffix (or not a domain): offers nothing
            continue
        if _asks_to_open(_clause_before(text, m.start())):
            out.sites.add(host)
    return out


# --- tracing where an effect went, without personal data in clear ------------------------------


def where(role: Role, value: str) -> str:
    """The part of a destination that is not personal: an address's domain, a URL's host."""
    if role == "recipient":
        address = parse_address(value)
        return address.rsplit("@", 1)[1] if address else "(not an address)"
    if role == "url":
        url = parse_url(value)
        return url.host if url else "(not a URL)"
    return ""


def normalised(role: Role, value: str) -> str:
    """The value as it is hashed and sealed: the parsed form when it parses, else as given."""
    if role == "recipient":
        return parse_address(value) or value
    if role == "url":
        url = parse_url(value)
        return str(url) if url else value
    return unicodedata.normalize("NFC", value)


def digest(key: bytes, tenant: str, role: Role, value: str) -> str:
    """A keyed hash of a destination, per tenant: whoever holds the audit key can tell whether an
    effect went to a given address; whoever reads the audit record alone cannot find out where."""
    tenant_key = hmac.new(key, f"mesh-audit-destination:v1:{tenant}".encode(), hashlib.sha256).digest()
    return "hmac-sha256:" + hmac.new(tenant_key, normalised(role, value).encode(), hashlib.sha256).hexdigest()[:32]
