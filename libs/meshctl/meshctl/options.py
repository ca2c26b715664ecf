"""Argument types and the parser class of ``meshctl`` (and of the commands other packages add
to it through the ``meshctl.commands`` entry point group): each refuses a bad value with a
one-line reason instead of a traceback."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from mesh_contracts.base import ID_PATTERN
from mesh_contracts.v1 import TaskPolicy
from meshctl import budget as spend


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def home(args: argparse.Namespace) -> Path:
    return Path(args.home).absolute()


def identifier(kind: str) -> Callable[[str], str]:
    """An argument type for ids that become subject tokens (tenant, task id)."""

    def check(value: str) -> str:
        if not re.match(ID_PATTERN, value):
            raise argparse.ArgumentTypeError(f"invalid {kind} {value!r}: use letters, digits, '-' or '_' (max 64)")
        return value

    return check


tenant, task_id = identifier("tenant"), identifier("task id")
step_id, route = identifier("step id"), identifier("route")
signal_name, signal_key = identifier("signal name"), identifier("signal key")


PROMPT_REF = re.compile(r"^([a-z][a-z0-9_-]*(?:\.[a-z0-9_-]+)+)@([0-9A-Za-z][0-9A-Za-z._-]{0,31})$")


def prompt_version(value: str) -> tuple[str, str]:
    """``ID@VERSION`` (``planner.plan@4``): a prompt id and one of its versions."""
    m = PROMPT_REF.match(value.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid prompt version {value!r}: use ID@VERSION, e.g. planner.plan@4")
    return m.group(1), m.group(2)


def days(value: str) -> float:
    """A retention in days: a positive number (fractions allowed: 0.5 is twelve hours)."""
    try:
        d = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of days") from None
    if not 0 < d <= 36500:
        raise argparse.ArgumentTypeError(f"{value!r}: a retention is more than 0 and at most 36500 days")
    return d


def cap(what: str) -> Callable[[str], int]:
    """A whole number, 0 (none) or more: a cap on ``what``."""

    def check(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of {what}") from None
        if n < 0:
            raise argparse.ArgumentTypeError(f"{value!r}: a number of {what} is 0 (no cap) or more")
        return n

    return check


def label(value: str) -> tuple[str, str]:
    """``KEY=VALUE``: a key of letters, digits, '-', '_' or '.'; a value of at most 128 characters."""
    key, sep, val = value.partition("=")
    if not sep or not re.match(r"^[A-Za-z0-9_.-]{1,64}$", key) or not val or len(val) > 128:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not KEY=VALUE (a key of letters, digits, '-', '_', '.'; a value of 1-128 characters)"
        )
    return key, val


def workflow_ref(value: str) -> str:
    """``NAME``, ``NAME@latest`` or ``NAME@<version>`` (16 hex digits)."""
    from mesh_contracts.v1.workflow_versions import parse_ref

    try:
        name, version = parse_ref(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{name}@{version}"


def agent_ref(value: str) -> str:
    """``NAME`` or ``NAME@<version>`` (16 hex digits) of an agent profile."""
    from mesh_contracts.v1.agents import parse_agent_ref

    try:
        name, version = parse_agent_ref(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return f"{name}@{version}" if version else name


def pool_name(value: str) -> str:
    """A worker pool's name: lower-case letters, digits and '-', at most 31."""
    from mesh_contracts.base import POOL_PATTERN

    if not value or not re.fullmatch(POOL_PATTERN, value):
        raise argparse.ArgumentTypeError(f"invalid pool name {value!r}: lower-case letters, digits and '-' (1-31)")
    return value


def agent_name(value: str) -> str:
    """An agent profile's name: lower-case letters, digits, '-' and '_', at most 48."""
    from mesh_contracts.v1.agents import AGENT_NAME

    if not re.fullmatch(AGENT_NAME, value):
        raise argparse.ArgumentTypeError(f"invalid agent name {value!r}: lower-case letters, digits, '-', '_' (1-48)")
    return value


def workflow_input(value: str) -> tuple[str, Any]:
    """``KEY=VALUE``: the value as JSON if it is JSON (``3``, ``true``, ``[1, 2]``), else the text."""
    key, sep, val = value.partition("=")
    if not sep or not re.match(r"^[A-Za-z0-9_-]{1,64}$", key):
        raise argparse.ArgumentTypeError(f"{value!r} is not KEY=VALUE (a key of letters, digits, '-' or '_')")
    try:
        return key, json.loads(val)
    except json.JSONDecodeError:
        return key, val


def server_name(value: str) -> str:
    """A tenant tool server's name: its tools are offered as ``<name>__<tool>``."""
    if not re.fullmatch(r"[a-z0-9_]{1,32}", value) or "__" in value:
        raise argparse.ArgumentTypeError(f"{value!r}: a server name is 1-32 of a-z, 0-9 and _ (no '__')")
    return value


def tenants(value: str) -> list[str]:
    return [tenant(t) for t in value.split(",") if t]


def policy(value: str) -> TaskPolicy:
    """A task policy as JSON (inline, or @FILE)."""
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        raw = json.loads(text)
        unknown = sorted(set(raw) - set(TaskPolicy.model_fields)) if isinstance(raw, dict) else []
        if unknown:  # a typo must not silently switch a check off
            raise argparse.ArgumentTypeError(
                f"unknown policy field(s) {', '.join(unknown)} (known: {', '.join(TaskPolicy.model_fields)})"
            )
        return TaskPolicy.model_validate(raw)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc.msg} at column {exc.colno}") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value[1:]}: {exc.strerror}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(policy)"
        raise argparse.ArgumentTypeError(f"{where}: {first['msg']}") from None


def positive(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if f <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {value!r}")
    return f


def priority(value: str) -> int:
    """A task priority: 0 (lowest) to 9 (highest)."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if not 0 <= n <= 9:
        raise argparse.ArgumentTypeError(f"must be 0 to 9: {value!r}")
    return n


def count(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {value!r}")
    return int(value)


def whole(value: str) -> int:
    """A whole number, 0 or more."""
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {value!r}")
    return int(value)


def at_least_zero(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not f >= 0 or f == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0: {value!r}")
    return f


def fraction(value: str) -> float:
    f = at_least_zero(value)
    if f > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {value!r}")
    return f


MAX_REPLICAS = 16


def replicas(value: str) -> dict[str, int]:
    """``N`` (every service N processes) or ``SERVICE=N[,SERVICE=N...]`` (the others one each)."""
    from mesh_contracts import SERVICES

    def count(text: str) -> int:
        if not text.isdigit() or not 1 <= int(text) <= MAX_REPLICAS:
            raise argparse.ArgumentTypeError(f"a replica count is 1-{MAX_REPLICAS}, got {text!r}")
        return int(text)

    if "=" not in value:
        return dict.fromkeys(SERVICES, count(value))
    out: dict[str, int] = {}
    for part in value.split(","):
        svc, _, n = part.partition("=")
        if svc not in SERVICES:
            raise argparse.ArgumentTypeError(f"unknown service {svc!r} in {value!r} (services: {', '.join(SERVICES)})")
        out[svc] = count(n)
    return out


def port(value: str) -> int:
    if not value.isdigit() or int(value) > 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {value!r}")
    return int(value)


def day(value: str) -> str:
    try:
        if not re.fullmatch(r"\d{8}", value):
            raise ValueError
        time.strptime(value, "%Y%m%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a day: {value!r} (use YYYYMMDD, e.g. {spend.today()})") from None
    return value


def http_url(value: str) -> str:
    """An http(s) base URL with a host, e.g. ``http://jaeger:16686``."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {value!r} (e.g. http://jaeger:16686)")
    return value.rstrip("/")
