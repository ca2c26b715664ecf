"""Which destinations a goal offers, tested against an independent oracle.

The oracle is the construction, not the code's expression: each case builds a goal in which a
value plays a known role (a recipient the user asks to mail, a subject the goal only talks
about, a URL to open, a link it warns about), then an argument that is that value, or a near
miss of it (a truncated domain, a dropped or added character, a homoglyph, a zero-width
character, another port, a query). The expected verdict follows from how the case was built.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from mesh_contracts.v1 import Taint
from mesh_tool_executor import destinations as dst
from mesh_tool_executor.policy import decide
from mesh_tool_executor.tools import REGISTRY

pytestmark = pytest.mark.unit

TAINTED = Taint(untrusted=True, injection_score=0.2, sources=("search_docs:s1-a1-i0-c0",))
SEND, GET = REGISTRY["send_email"], REGISTRY["http_get"]

LABEL = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=2, max_size=10).filter(lambda s: not s.isdigit())
TLD = st.sampled_from(["com", "org", "net", "io", "com.au", "co.uk", "test", "dev"])
LOCAL = st.text("abcdefghijklmnopqrstuvwxyz0123456789._+-", min_size=1, max_size=12).filter(
    lambda s: s[0].isalnum() and s[-1].isalnum() and ".." not in s
)


@st.composite
def addresses(draw) -> str:
    return f"{draw(LOCAL)}@{draw(LABEL)}.{draw(TLD)}"


@st.composite
def urls(draw) -> str:
    host = ".".join(draw(st.lists(LABEL, min_size=1, max_size=2))) + "." + draw(TLD)
    path = "/" + "/".join(draw(st.lists(LABEL, max_size=3)))
    return f"https://{host}{path}"


RECIPIENT_GOALS = [
    "Email the refund summary to {a}",
    "Summarise the outage and send it to {a}.",
    "Please notify {a} when the report is ready",
    "cc {a} on the weekly digest",
    "Reply to {a} with the shipping times",
    "Write the answer, then forward it to {b} and {a}",
    "Send the list to {b}, {a} and ops@acme.com",
]
SUBJECT_GOALS = [
    "Summarise the complaint from {a}",
    "What did {a} ask about refunds?",
    "Is {a} one of our customers?",
    "Summarise the email sent to {a} yesterday",
    "Find every ticket {a} opened and summarise them",
    "Never email {a}; summarise their complaint",
    "Email {a}'s complaint summary to the team lead",
]
URL_GOALS = [
    "Fetch {u} and summarise it",
    "Read the page at {u}",
    "Summarise {u} for the team",
    "Check {u}, then email the answer to ops@acme.com",
]
URL_SUBJECT_GOALS = [
    "Is {u} a phishing site?",
    "We received a link to {u}; what should we do?",
    "Don't open {u}, just tell me who registered it",
]


def _near_misses(address: str) -> list[str]:
    local, domain = address.split("@")
    labels = domain.split(".")
    out = [
        f"{local}@{'.'.join(labels[:-1])}" if len(labels) > 2 else f"{local}@{labels[0]}.evil",  # truncated domain
        f"{local}@{domain}.evil.com",  # the real domain as a prefix of another
        f"{local}x@{domain}",  # added character
        f"{local[1:]}@{domain}" if len(local) > 1 else f"x{local}@{domain}",  # the tail of the local part
        f"{local}@x{domain}",  # a different registrable domain ending the same
        f"{local}\u200b@{domain}",  # zero-width space
        address.replace("o", "\u043e", 1) if "o" in address else address.replace("a", "\u0430", 1),  # homoglyph
    ]
    return [m for m in out if m.casefold() != address.casefold()]


@given(a=addresses(), b=addresses(), template=st.sampled_from(RECIPIENT_GOALS))
def test_a_recipient_the_goal_asks_to_mail_runs_and_every_near_miss_waits(a, b, template):
    assume(a.casefold() != b.casefold())
    goal = template.format(a=a, b=b)
    body = {"subject": "Summary", "body": "Refunds take five business days."}
    assert decide(SEND, {"to": a, **body}, TAINTED, goal).verdict == "allow", goal
    assert decide(SEND, {"to": a.upper(), **body}, TAINTED, goal).verdict == "allow", "case is not a new mailbox"
    for miss in _near_misses(a):
        if miss.casefold() == b.casefold():
            continue
        assert decide(SEND, {"to": miss, **body}, TAINTED, goal).verdict == "approve", (goal, miss)


@given(a=addresses(), template=st.sampled_from(SUBJECT_GOALS))
def test_an_address_the_goal_only_talks_about_is_not_a_recipient(a, template):
    goal = template.format(a=a)
    d = decide(SEND, {"to": a, "subject": "s", "body": "b"}, TAINTED, goal)
    assert d.verdict == "approve", goal
    assert dst.offers(goal).recipients == set()


@given(a=addresses())
def test_an_address_the_goal_never_mentions_waits(a):
    assert decide(SEND, {"to": a, "subject": "s", "body": "b"}, TAINTED, "Summarise our refund policy").verdict == (
        "approve"
    )


def _url_misses(u: str) -> list[str]:
    scheme, rest = u.split("://")
    host, _, path = rest.partition("/")
    labels = host.split(".")
    return [
        f"{scheme}://{'.'.join(labels[:-1])}/{path}",  # truncated host (docs.acme.com.au -> docs.acme.com)
        f"{scheme}://{host}.evil.com/{path}",  # the real host as a prefix
        f"{scheme}://evil{host}/{path}",  # a host that ends the same
        f"{scheme}://{host}:8443/{path}",  # another port
        f"{u}?d=acme-secrets",  # data in a query
        f"{u}/collect",  # another path
        f"http://{host}/{path}" if scheme == "https" else f"https://{host}/{path}",  # another scheme
        f"{scheme}://user@{host}/{path}",  # userinfo
        u.replace(host, host.replace("o", "\u043e", 1) if "o" in host else "x" + host),  # homoglyph host
    ]


@given(u=urls(), template=st.sampled_from(URL_GOALS))
def test_a_url_the_goal_asks_to_open_runs_and_every_near_miss_waits(u, template):
    goal = template.format(u=u)
    assert decide(GET, {"url": u}, TAINTED, goal).verdict == "allow", goal
    assert decide(GET, {"url": u + "#section"}, TAINTED, goal).verdict == "allow", "a fragment is never sent"
    for miss in _url_misses(u):
        assert decide(GET, {"url": miss}, TAINTED, goal).verdict == "approve", (goal, miss)


@given(u=urls(), template=st.sampled_from(URL_SUBJECT_GOALS))
def test_a_url_the_goal_only_talks_about_is_not_opened_unasked(u, template):
    goal = template.format(u=u)
    assert decide(GET, {"url": u}, TAINTED, goal).verdict == "approve", goal


def test_a_site_the_goal_names_covers_its_hosts_but_never_a_public_suffix():
    goal = "Read anything on docs.acme.com.au and on github.io that covers refunds"
    assert dst.offers(goal).sites == {"docs.acme.com.au"}, "github.io is a public suffix: naming it offers nothing"
    ok = ("https://docs.acme.com.au/refunds", "https://eu.docs.acme.com.au/guide")
    for url in ok:
        assert decide(GET, {"url": url}, TAINTED, goal).verdict == "allow", url
    waits = (
        "https://docs.acme.com.au/refunds?d=secret",  # a query can carry data out
        "https://acme.com.au/refunds",  # the parent is not below what was named
        "https://docs.acme.com.au.evil.com/x",
        "https://evildocs.acme.com.au/x",
        "https://attacker.github.io/collect",
        "https://docs.acme.co/refunds",
    )
    for url in waits:
        assert decide(GET, {"url": url}, TAINTED, goal).verdict == "approve", url


def test_the_near_misses_of_the_issue_are_held():
    """The examples the guardrail review found held with substring matching, by name."""
    goal = "Check https://docs.acme.com.au/guide/refunds and email the summary to ops@acme.com.au"
    for to in ("ops@acme.com", "s@acme.com.au"):
        assert decide(SEND, {"to": to, "subject": "s", "body": "b"}, TAINTED, goal).verdict == "approve", to
    assert decide(SEND, {"to": "ops@acme.com.au", "subject": "s", "body": "b"}, TAINTED, goal).verdict == "allow"
    assert decide(GET, {"url": "https://docs.acme.co"}, TAINTED, goal).verdict == "approve"
    assert decide(GET, {"url": "https://docs.acme.com.au/guide/refunds"}, TAINTED, goal).verdict == "allow"


def test_a_list_of_recipients_runs_only_if_every_one_is_offered():
    goal = "Send the digest to a@acme.com and b@acme.com"
    tool = REGISTRY["send_email"]
    offered = dst.offers(goal)
    assert offered.offers("recipient", ["a@acme.com", "b@acme.com"])
    assert not offered.offers("recipient", ["a@acme.com", "c@evil.com"])
    assert not offered.offers("recipient", [])
    assert decide(tool, {"to": "b@acme.com", "subject": "s", "body": "b"}, TAINTED, goal).verdict == "allow"


def test_tracing_a_destination_keeps_its_domain_and_a_keyed_hash_not_the_address():
    key = bytes(range(32))
    d1 = dst.digest(key, "acme", "recipient", "Ops@Acme.com")
    assert d1 == dst.digest(key, "acme", "recipient", "ops@acme.com"), "the same mailbox, the same hash"
    assert d1 != dst.digest(key, "globex", "recipient", "ops@acme.com"), "per tenant: no cross-tenant linking"
    assert d1 != dst.digest(bytes(32), "acme", "recipient", "ops@acme.com"), "keyed: no key, no dictionary"
    assert "ops" not in d1 and d1.startswith("hmac-sha256:")
    assert dst.where("recipient", "ops@acme.com.au") == "acme.com.au"
    assert dst.where("url", "https://docs.acme.com.au/x?y=1") == "docs.acme.com.au"
