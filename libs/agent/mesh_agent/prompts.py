"""Prompts as versioned artifacts: files in each service's package, never string literals.

A prompt file is ``<package>/prompts/<name>.md``::

    ---
    id: planner.plan
    version: 3
    description: what the prompt is for (optional)
    ---
    The text, with ``{placeholders}`` filled by ``Prompt.render`` (``{{`` and ``}}`` are
    literal braces, as in ``str.format``).

Its reference ``<id>@<version>+<digest>`` (the digest is the first 8 hex digits of the text's
sha256) is what every model call records: on its span, its ``usage.recorded`` and the task's
outcome, so a prompt change can be evaluated against a golden set and rolled back like code.
The digest catches an edit that forgot to bump the version.

``MESH_PROMPTS_DIR`` (``AgentSettings.prompts_dir``) names a directory of override files
(``<id>.md``, same format) that replace the packaged prompt of that id: an operator rolls a
prompt forward or back without rebuilding an image. A service loads its prompts when it is
built, with its settings' directory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

from mesh_agent.errors import AgentError

ID = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)+$")
VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,31}$")
FRONT = re.compile(r"\A---\n(.*?)\n---\n?(.*)\Z", re.S)


class PromptError(ValueError, AgentError):
    """A prompt file that cannot be used (missing, no front matter, bad id or version)."""


@dataclass(frozen=True)
class Prompt:
    id: str
    version: str
    text: str
    source: str
    """Where it was read from (package resource or override file), for error messages."""
    description: str = ""

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:8]

    @property
    def ref(self) -> str:
        """``<id>@<version>+<digest>``: recorded on every model call made with this prompt."""
        return f"{self.id}@{self.version}+{self.digest}"

    def render(self, **values: object) -> str:
        try:
            return self.text.format(**values)
        except (KeyError, IndexError) as exc:
            raise PromptError(f"prompt {self.ref}: no value for placeholder {exc}") from None


def parse(text: str, source: str) -> Prompt:
    m = FRONT.match(text.replace("\r\n", "\n"))
    if not m:
        raise PromptError(f"{source}: a prompt file starts with a '---' front matter block (id, version)")
    meta: dict[str, str] = {}
    for line in m.group(1).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PromptError(f"{source}: front matter line {line!r} is not 'key: value'")
        meta[key.strip()] = value.strip()
    pid, version = meta.get("id", ""), meta.get("version", "")
    if not ID.match(pid):
        raise PromptError(f"{source}: id {pid!r} must look like '<service>.<name>'")
    if not VERSION.match(version):
        raise PromptError(f"{source}: version {version!r} must be a short identifier such as 3 or 2026-11-22")
    body = m.group(2).strip("\n")
    if not body.strip():
        raise PromptError(f"{source}: the prompt text is empty")
    return Prompt(pid, version, body, source, meta.get("description", ""))


@cache
def load(package: str, name: str, override_dir: str | Path | None = None) -> Prompt:
    """The prompt ``name`` shipped in ``package`` (``mesh_planner``, ``plan``), or its override
    from ``override_dir`` (``MESH_PROMPTS_DIR``) when that directory holds a file for the same id."""
    try:
        text = resources.files(package).joinpath("prompts", f"{name}.md").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise PromptError(f"prompt {package}/prompts/{name}.md not found: {exc}") from None
    packaged = parse(text, f"{package}/prompts/{name}.md")
    if override_dir:
        path = Path(override_dir) / f"{packaged.id}.md"
        if path.is_file():
            override = parse(path.read_text(encoding="utf-8"), str(path))
            if override.id != packaged.id:
                raise PromptError(f"{path}: declares id {override.id!r}, the file name says {packaged.id!r}")
            return override
    return packaged


def chosen(current: Prompt, versions: Mapping[str, str] | None, override_dir: str | Path | None = None) -> Prompt:
    """The prompt a call uses when a replay names versions (``Replay.prompts``: id -> version):
    ``current`` when none is named for its id or it is that version, else the file
    ``<override_dir>/<id>/<version>.md`` (under ``MESH_PROMPTS_DIR``), which must declare that id
    and version. ``PromptError`` names the file that is missing."""
    want = (versions or {}).get(current.id)
    if not want or want == current.version:
        return current
    return _version_file(current.id, want, str(override_dir or ""), current.ref)


@cache
def _version_file(pid: str, version: str, override_dir: str, serving: str) -> Prompt:
    where = f"{pid}/{version}.md"
    if not override_dir:
        raise PromptError(f"prompt {pid} version {version} is not here: this service serves {serving} and has no "
                          f"MESH_PROMPTS_DIR to hold {where}")  # fmt: skip
    path = Path(override_dir) / pid / f"{version}.md"
    if not path.is_file():
        raise PromptError(f"prompt {pid} version {version} is not here: this service serves {serving}; "
                          f"put {where} in its MESH_PROMPTS_DIR")  # fmt: skip
    found = parse(path.read_text(encoding="utf-8"), str(path))
    if (found.id, found.version) != (pid, version):
        raise PromptError(f"{path}: declares {found.id} version {found.version}, its path says {pid} version {version}")
    return found
