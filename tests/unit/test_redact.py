"""Secret and PII redaction: every kind on realistic samples, near-misses left alone, idempotence,
nested values, and the log filter on a real logger.

Secret samples are generated at run time (random bodies with the real prefixes and lengths),
never written into the source: a fixed fake key in a test file is what secret scanners flag."""

from __future__ import annotations

import io
import logging
import random
import string
import time
from collections import namedtuple

import nkeys
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_guardrails.logfilter import RedactingFilter, install
from mesh_guardrails.redact import KINDS, redact, redact_value
from mesh_identity import new_signing_key, private_pem
from meshctl.identity import creds_text, new_keypair, user_jwt
from meshctl.policy import Permissions

pytestmark = pytest.mark.unit

RNG = random.Random(20240517)
ALNUM = string.ascii_letters + string.digits


def rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(RNG.choice(alphabet) for _ in range(n))


def nats_seed(prefix: int = nkeys.PREFIX_BYTE_USER) -> str:
    return nkeys.encode_seed(bytes(RNG.getrandbits(8) for _ in range(32)), prefix).decode()


def nats_user_jwt() -> tuple[str, nkeys.KeyPair]:
    account = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    signing = new_keypair(nkeys.PREFIX_BYTE_ACCOUNT)
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    perms = Permissions("worker", "worker", None, pub=["task.>"], sub=["work.>"])
    return user_jwt(account, signing, user, perms, expires_in_s=3600), user


SEED = nats_seed()
JWT, USER = nats_user_jwt()
OPENAI = "sk-" + rand(48)
OPENAI_PROJ = "sk-proj-" + rand(40) + "_" + rand(40)
ANTHROPIC = "sk-ant-api03-" + rand(86, ALNUM + "-_") + "AA"
AWS_ID = "AKIA" + rand(16, string.ascii_uppercase + string.digits)
AWS_SECRET = rand(40, ALNUM + "/+")
GITHUB = "ghp_" + rand(36)
GITHUB_PAT = "github_pat_" + rand(22) + "_" + rand(59)
SLACK = "xoxb-" + rand(12, string.digits) + "-" + rand(13, string.digits) + "-" + rand(24)
GOOGLE = "AIza" + rand(35, ALNUM + "-_")
STRIPE = "sk_live_" + rand(24)
BEARER = rand(40, ALNUM + "._-")

# (kind, text, the secret that must disappear)
POSITIVE = [
    ("nats-seed", f"loaded user seed {SEED} from disk", SEED),
    ("nats-seed", f"account: {nats_seed(nkeys.PREFIX_BYTE_ACCOUNT)}", "SA"),
    ("nats-seed", f"operator={nats_seed(nkeys.PREFIX_BYTE_OPERATOR)};", "SO"),
    ("nats-jwt", f"connect with jwt {JWT}", JWT),
    (
        "jwt",
        "Authorization header eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
        "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ."
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c was rejected",
        "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ),
    ("nats-creds", "creds file:\n" + creds_text(JWT, USER), USER.seed.decode()),
    ("private-key", "key=" + private_pem(new_signing_key()).decode(), "-----BEGIN PRIVATE KEY-----"),
    (
        "private-key",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
        "-----END OPENSSH PRIVATE KEY-----",
        "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ",
    ),
    (
        "private-key",
        '{"pem": "-----BEGIN RSA PRIVATE KEY-----\\nMIIEowIBAAKCAQEAr' + rand(60) + '"}',
        "MIIEowIBAAKCAQEAr",
    ),
    ("api-key", f"OpenAI error for key {OPENAI}: quota exceeded", OPENAI),
    ("api-key", f"using {OPENAI_PROJ}", OPENAI_PROJ),
    ("api-key", f"x-api-key: {ANTHROPIC}", ANTHROPIC),
    ("api-key", f"aws_access_key_id={AWS_ID}", AWS_ID),
    ("api-key", f"aws_secret_access_key = {AWS_SECRET}", AWS_SECRET),
    ("api-key", f'{{"AWS_SECRET_ACCESS_KEY": "{AWS_SECRET}"}}', AWS_SECRET),
    ("api-key", f"git clone https://{GITHUB}@github.com/acme/repo", GITHUB),
    ("api-key", f"token {GITHUB_PAT}", GITHUB_PAT),
    ("api-key", f"slack bot {SLACK} posted", SLACK),
    ("api-key", f"maps key {GOOGLE}", GOOGLE),
    ("api-key", f"stripe.api_key = '{STRIPE}'", STRIPE),
    ("api-key", "OPENAI_API_KEY=abc123def456", "abc123def456"),
    ("password", "redis://:s3cr3t-Pa55@redis.internal:6379/0", "s3cr3t-Pa55"),
    ("password", "nats://worker:pa@ss:word@nats.mesh.local:4222", "pa@ss:word"),
    ("password", "postgresql://app:Tr0ub4dor&3@db.internal/app", "Tr0ub4dor&3"),
    ("secret", f"Authorization: Bearer {BEARER}", BEARER),
    ("secret", "Authorization: Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy"),
    ("secret", "MESH_REDIS_PASSWORD=hunter2 started", "hunter2"),
    ("secret", 'config {"client_secret": "not a pattern at all"}', "not a pattern at all"),
    ("secret", "password: hunter2", "hunter2"),
    ("secret", "https://app.example.com/reset?token=8f2a1c9e77&user=5", "8f2a1c9e77"),
    ("email", "notify ops@acme.test about it", "ops@acme.test"),
    ("email", "From: Jane Doe <jane.doe+billing@mail.example.co.uk>", "jane.doe+billing@mail.example.co.uk"),
    ("iban", "pay to DE89 3704 0044 0532 0130 00 today", "3704 0044 0532"),
    ("iban", "IBAN GB82WEST12345698765432.", "GB82WEST12345698765432"),
    ("card", "card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
    ("card", "amex 378282246310005", "378282246310005"),
    ("ssn", "SSN 123-45-6789 on file", "123-45-6789"),
    ("phone", "call +1 415 555 0132 now", "555 0132"),
    ("phone", "office (415) 555-0132", "555-0132"),
    ("phone", "mobile +4915123456789", "4915123456789"),
    ("ip", "client 10.0.12.7 connected", "10.0.12.7"),
]

NEGATIVE = [
    "the prefix sk- marks a secret key; never paste one here",
    "pipelines built from sk-learn-compatible-estimators-and-transformers",
    "reference 4111111111111112 is not a card (Luhn fails)",
    "order ORD-2024-000123 shipped",
    "order 20240517-8842 shipped",
    "event at 1715940000 (epoch seconds)",
    "version 1.2.300.4 released",
    "max_tokens=512 prompt_tokens: 40 completion_tokens=96",
    "the token: it expires in an hour",
    "see https://example.com:8443/path?page=2",
    "send the password reset link to the user",
    "the AKIA prefix marks AWS access key ids",
    f"user public key {USER.public_key.decode()} is not a secret",
    "date 2024-05-17 and time 10:22:31",
]


@pytest.mark.parametrize(("kind", "text", "secret"), POSITIVE, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(POSITIVE)])
def test_each_kind_is_redacted_with_its_label(kind, text, secret):
    out = redact(text)
    assert f"[REDACTED:{kind}]" in out, out
    assert secret not in out, out


@pytest.mark.parametrize("text", NEGATIVE)
def test_near_misses_are_left_alone(text):
    assert redact(text) == text


def test_kinds_cover_the_issue_and_keep_the_old_labels():
    new = {"nats-creds", "private-key", "password", "jwt", "nats-jwt", "nats-seed", "api-key"}
    old = {"email", "secret", "iban", "card", "ssn", "phone", "ip"}
    assert new | old == set(KINDS)
    assert KINDS.index("nats-seed") < KINDS.index("api-key") < KINDS.index("email"), "secrets before generic PII"


def test_a_creds_file_is_one_redaction_and_nothing_of_it_survives():
    text = creds_text(JWT, USER)
    out = redact(f"wrote\n{text}\ndone")
    assert out.count("[REDACTED:nats-creds]") == 1
    assert JWT not in out and USER.seed.decode() not in out and "NKEY" not in out


def test_a_creds_file_escaped_in_json_is_redacted_too():
    import json

    out = redact(json.dumps({"creds": creds_text(JWT, USER)}))
    assert "[REDACTED:nats-creds]" in out and USER.seed.decode() not in out


def test_a_truncated_private_key_is_still_redacted():
    pem = private_pem(new_signing_key()).decode()
    body = pem.splitlines()[1]
    out = redact(pem[: len(pem) // 2])
    assert "[REDACTED:private-key]" in out and body[:20] not in out


def test_iban_checksum_decides():
    assert "[REDACTED:iban]" not in redact("ref DE00 3704 0044 0532 0130 00")  # mod-97 fails
    assert redact("IBAN FR1420041010050500013M02606") == "IBAN [REDACTED:iban]"


def test_a_valid_iban_followed_by_more_text_keeps_the_text():
    assert redact("DE89370400440532013000 1234") == "[REDACTED:iban] 1234"


def test_keep_leaves_named_kinds_for_an_approver():
    args = {"to": "bob@partner.example", "url": "http://10.1.2.3/x?token=abc123xyz&u=a@b.example"}
    out = redact_value(args, keep=("email", "url"))
    assert out["to"] == "bob@partner.example"
    assert out["url"].startswith("http://10.1.2.3/x?token=[REDACTED:secret]")
    assert "a@b.example" in out["url"]
    assert redact_value(args)["to"] == "[REDACTED:email]"


def test_redact_value_walks_nested_structures():
    Point = namedtuple("Point", "label value")
    value = {
        "to": "ops@acme.test",
        "password": "hunter2",
        "api_key": 12345,
        "token": None,
        "nested": [{"seed": SEED}, ("card 4111 1111 1111 1111", 7), {"x@y.example", "plain"}],
        "bytes": b"mail me at a@b.example",
        "point": Point("ip", "10.0.0.1"),
        "count": 3,
        "flag": True,
        "ops@acme.test": "key that is an address",
    }
    out = redact_value(value)
    assert out["to"] == "[REDACTED:email]"
    assert out["password"] == "[REDACTED:secret]" and out["api_key"] == "[REDACTED:secret]"
    assert out["token"] is None and out["count"] == 3 and out["flag"] is True
    assert out["nested"][0]["seed"] == "[REDACTED:nats-seed]"
    assert out["nested"][1] == ("card [REDACTED:card]", 7)
    assert out["nested"][2] == {"[REDACTED:email]", "plain"}
    assert out["bytes"] == "mail me at [REDACTED:email]"
    assert out["point"] == Point("ip", "[REDACTED:ip]")
    assert out["[REDACTED:email]"] == "key that is an address", "a key is redacted, not dropped"
    assert len(out) == len(value)
    assert value["password"] == "hunter2", "the input is not modified"


def test_redact_value_cuts_cycles():
    d: dict = {"a": "x@y.example"}
    d["self"] = d
    assert redact_value(d) == {"a": "[REDACTED:email]", "self": "[REDACTED:cycle]"}


def test_redact_never_raises_and_fails_closed():
    assert redact(12345) == "12345"  # type: ignore[arg-type]
    assert redact("\ud800 lone surrogate a@b.example") == "\ud800 lone surrogate [REDACTED:email]"
    assert redact("") == ""


def test_long_inputs_stay_linear():
    blob = rand(1_000_000, ALNUM + "+/")
    for text in (blob, "a" * 1_000_000, "1" * 200_000, "a@" * 100_000, "x=" * 200_000):
        started = time.process_time()
        redact(text)
        assert time.process_time() - started < 5, f"quadratic on {text[:10]!r}..."


SAMPLES = [text for _, text, _ in POSITIVE] + NEGATIVE


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_idempotent_on_arbitrary_text(text):
    once = redact(text)
    assert redact(once) == once


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=30), st.sampled_from(SAMPLES)), max_size=6).map(" ".join))
def test_idempotent_on_text_full_of_secrets(text):
    once = redact(text)
    assert redact(once) == once


def test_secrets_in_a_mixed_text_all_disappear():
    text = " | ".join(text for _, text, _ in POSITIVE)
    out = redact(text)
    for _, _, secret in POSITIVE:
        assert secret not in out


# --------------------------------------------------------------------------- the log filter


@pytest.fixture
def captured():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s [%(tenant)s]"))
    logger = logging.getLogger("test.redact.filter")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    install(handler)
    yield logger, stream
    logger.removeHandler(handler)


def test_log_filter_redacts_args_exceptions_and_extras(captured):
    logger, stream = captured
    logger.info("provider %s rejected key %s", "openai", OPENAI, extra={"tenant": "ops@acme.test"})
    logger.warning("connecting with seed %s at 100%% %s", SEED, "now", extra={"tenant": "acme"})
    try:
        raise ConnectionError(f"nats://worker:pw-{SEED[:6]}@nats:4222 refused; seed {SEED}; key {ANTHROPIC}")
    except ConnectionError:
        logger.exception("could not connect (%s)", GITHUB, extra={"tenant": "acme"})
    out = stream.getvalue()
    for secret in (OPENAI, SEED, ANTHROPIC, GITHUB, "ops@acme.test", f"pw-{SEED[:6]}"):
        assert secret not in out, out
    assert "[REDACTED:api-key]" in out and "[REDACTED:nats-seed]" in out and "[REDACTED:email]" in out
    assert "at 100% now" in out, "formatted once; the % in the result is not formatted again"
    assert "Traceback" in out and "ConnectionError" in out, "the exception is still logged, redacted"


def test_log_filter_leaves_the_record_formatted_once(captured):
    logger, _ = captured
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, "key %s", (OPENAI,), None)
    RedactingFilter().filter(record)
    assert record.args is None and record.msg == "key [REDACTED:api-key]"
    assert record.getMessage() == "key [REDACTED:api-key]"


def test_log_filter_survives_a_bad_format_string(captured):
    logger, stream = captured
    logger.error("count %d of %s", "not a number", extra={"tenant": "acme"})
    assert "not a number" in stream.getvalue()


def test_install_is_idempotent_and_defaults_to_the_root_handlers():
    handler = logging.StreamHandler(io.StringIO())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        install()
        install()
        assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    finally:
        root.removeHandler(handler)


def test_a_dotted_quad_is_an_ip_address_not_a_phone_number():
    # the HTTP tool's refusals name the address; it must read as what it is
    assert redact("refused: 169.254.169.254 is link-local") == "refused: [REDACTED:ip] is link-local"
    assert redact("call +31 20 123 4567") == "call [REDACTED:phone]"
