"""Generate the committed contract artifacts and check them.

    python -m mesh_contracts.generate write   # regenerate schemas/ and asyncapi.yaml
    python -m mesh_contracts.generate check   # fail on drift or on a breaking change

Breaking-change rules (a consumer of either side must still read the other side's
messages): a removed property, a property that became required, or a property whose
type changed. Each committed schema is compared with every earlier version of the same
file in git history, so a breaking edit fails CI even if the schema was regenerated.

That needs the history: in a shallow clone (what a CI checkout makes by default) the only
earlier version is the commit being checked, and a breaking edit would pass. ``check`` first
fetches the missing history (``git fetch --unshallow``) and fails, saying why, when it cannot;
outside git it fails too unless told ``--no-history`` (an unpacked sdist has nothing to compare).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mesh_contracts import __name__ as _pkg
from mesh_contracts import typescript
from mesh_contracts.base import CLIENT, Contract
from mesh_contracts.errors import ContractsError
from mesh_contracts.registry import VERSIONS
from mesh_contracts.topology import BUCKETS, DOOR_PREFIX, STREAMS, Door, door_of
from mesh_contracts.v1.agents import AGENT_RECORDS
from mesh_contracts.v1.records import RECORDS, Record
from mesh_contracts.v1.tenants import TenantRecord
from mesh_contracts.v1.tool_servers import TOOL_SERVER_RECORDS
from mesh_contracts.v1.workflow import SCHEMA_VERSION as WORKFLOW_SCHEMA_VERSION
from mesh_contracts.v1.workflow import WorkflowDefinition

ROOT = Path(__file__).resolve().parent.parent  # the contracts/ folder
SCHEMAS = ROOT / "schemas"
ASYNCAPI = ROOT / "asyncapi.yaml"
VOCABULARY = SCHEMAS / "mesh-vocabulary.json"
DRAFT = "https://json-schema.org/draft/2020-12/schema"
VOCABULARY_ID = "agentmesh://contracts/meta/mesh-vocabulary"

ANNOTATIONS: dict[str, tuple[dict[str, Any], str]] = {
    "x-producers": ({"type": "array", "items": {"type": "string"}}, "Services (principals) that publish the message."),
    "x-consumers": (
        {"type": "array", "items": {"type": "string"}},
        "Services that consume it; `client` is a tenant's own application.",
    ),
    "x-transport": (
        {"enum": ["stream", "core", "reply", "request"]},
        "`stream`: stored in a JetStream stream; `core`: core NATS, never stored; `reply`: a core request's "
        "answer; `request`: a core request (AsyncAPI only).",
    ),
    "x-subject": ({"type": "string"}, "The subject it travels on, `{tenant}` and `{task}` filled in."),
    "x-door": (
        {
            "type": "object",
            "properties": {"subject": {"type": "string"}, "keeper": {"type": "string"}},
            "required": ["subject", "keeper"],
            "additionalProperties": False,
        },
        "Where a tenant hands it in (a core request; the keeper stores it under the tenant's quota).",
    ),
    "x-bucket": ({"type": "string"}, "The key-value bucket a record lives in."),
    "x-key": ({"type": "string"}, "The record's key in its bucket."),
    "x-writer": ({"type": "string"}, "Who writes the record."),
    "x-readers": ({"type": "array", "items": {"type": "string"}}, "Who may read it."),
    "x-sealed": (
        {"type": "array", "items": {"type": "string"}},
        'Fields that travel sealed with the tenant\'s data key (`{"$sealed": "dk1...."}`, XChaCha20-Poly1305, '
        "associated data `<type>/v<major>|<tenant>|<task>|<field>`): a client seals them before sending and "
        "opens them after verifying.",
    ),
    "discriminator": (
        {"type": "object"},
        "OpenAPI's discriminator, which pydantic writes beside a tagged `oneOf` (a workflow definition's nodes): "
        "an annotation only; the `oneOf` decides.",
    ),
}
"""The annotation keywords the contracts carry beside JSON Schema's own: what a validator needs
to know to accept them (Ajv's strict mode refuses an unknown keyword), and what they mean."""


def vocabulary() -> dict[str, Any]:
    """A meta-schema declaring the contracts' ``x-*`` keywords as an optional vocabulary
    (``$vocabulary`` false: a validator that does not know it may ignore them, as annotations).
    Ajv: ``ajv.addVocabulary(Object.keys(meta.properties))``; Python's jsonschema needs nothing."""
    vocab = {f"https://json-schema.org/draft/2020-12/vocab/{v}": True for v in
             ("core", "applicator", "unevaluated", "validation", "meta-data", "format-annotation", "content")}  # fmt: skip
    return {
        "$schema": DRAFT,
        "$id": VOCABULARY_ID,
        "$vocabulary": {**vocab, "agentmesh://contracts/vocab/annotations": False},
        "$dynamicAnchor": "meta",
        "title": "AgentMesh contract annotations",
        "description": "JSON Schema 2020-12 plus the annotation keywords of AgentMesh's contracts. Every schema "
        "under schemas/ validates against this meta-schema. Generated from mesh_contracts; do not edit.",
        "allOf": [{"$ref": DRAFT}],
        "properties": {k: {**shape, "description": why} for k, (shape, why) in ANNOTATIONS.items()},
    }


HEADERS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Envelope metadata; travels in NATS headers, never in the body.",
    "properties": {
        "Mesh-Schema": {"type": "string", "description": "Schema id, e.g. task.submitted/v1"},
        "Mesh-Tenant": {"type": "string", "description": "Tenant (also subject token 3)"},
        "Mesh-Task": {"type": "string", "description": "Task id (also subject token 4)"},
        "Mesh-Causation": {"type": "string", "description": "Nats-Msg-Id of the message that caused this one"},
        "Mesh-Identity": {"type": "string", "description": "EdDSA JWT naming the sender, tenant and body digest"},
        "Mesh-Facts": {
            "type": "string",
            "description": "What the budget may know of the message (ids, statuses, keyed digests; never content): "
            "compact JSON, covered by the identity token (claim fct). Messages of the task, step, tool, rag, check, "
            "control and approval domains (mesh_contracts.facts)",
        },
        "Nats-Msg-Id": {"type": "string", "description": "Deterministic id; the server deduplicates on it"},
        "traceparent": {"type": "string", "description": "W3C trace context"},
    },
    "required": ["Mesh-Schema", "Mesh-Identity", "Nats-Msg-Id"],
}


def _file_name(c: type[Contract]) -> str:
    return f"{c.type_name()}.json"


def schemas() -> dict[str, dict[str, Any]]:
    """Relative path -> JSON Schema for every contract of every major version."""
    out: dict[str, dict[str, Any]] = {}
    for major, contracts in VERSIONS.items():
        for c in contracts:
            s = {"$schema": DRAFT, **c.model_json_schema()}
            s["$id"] = f"agentmesh://contracts/{c.schema_id()}"
            s["x-producers"] = list(c.spec.producers)
            s["x-consumers"] = list(c.spec.consumers)
            s["x-transport"] = c.spec.transport
            s["x-subject"] = f"{c.spec.domain}.v{major}.{{tenant}}.{{task}}.{c.spec.event}"
            if c.spec.sealed:
                s["x-sealed"] = list(c.spec.sealed)
            if c.spec.transport == "stream" and (door := door_of(c)) is not None:
                s["x-door"] = {"subject": f"{DOOR_PREFIX}.{s['x-subject']}", "keeper": door.service}
            out[f"v{major}/{_file_name(c)}"] = s
    buckets = {b.name: b for b in BUCKETS}
    records: tuple[type[Record], ...] = (*RECORDS, TenantRecord, *TOOL_SERVER_RECORDS, *AGENT_RECORDS)
    for r in records:  # key-value records other services read: contracts too
        s = {"$schema": DRAFT, **r.model_json_schema()}
        s["$id"] = f"agentmesh://contracts/{r.schema_id()}"
        s["x-bucket"] = r.bucket
        s["x-key"] = r.key_format
        b = buckets[r.bucket]
        s["x-writer"] = b.writer or (f"each of {', '.join(b.per_service)}, its own keys" if b.per_service else "")
        s["x-readers"] = list(b.readers)
        out[f"v1/record.{r.name}.json"] = s
    # What a tenant writes, not what travels: a workflow definition (YAML or JSON), checked by
    # any JSON Schema validator (Ajv's strict mode once told the vocabulary: its tagged nodes carry
    # OpenAPI's ``discriminator``, which the vocabulary declares as an annotation).
    wf = WorkflowDefinition.model_json_schema()
    wf = {"$schema": DRAFT,
          "$id": f"agentmesh://contracts/workflow.definition/v{WORKFLOW_SCHEMA_VERSION}", **wf}  # fmt: skip
    out["v1/workflow.definition.json"] = wf
    return out


def asyncapi() -> dict[str, Any]:
    """One AsyncAPI 3.0 document for the whole mesh."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    components_schemas: dict[str, Any] = {}
    for major, contracts in VERSIONS.items():
        for c in contracts:
            key = f"{c.type_name().replace('.', '_')}_v{major}"
            schema = c.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, d in schema.pop("$defs", {}).items():
                components_schemas[name] = d
            components_schemas[key] = schema
            messages[key] = _message(c, key)
            address = (
                f"{c.spec.domain}.v{major}.{{tenant}}.{{task}}.{c.spec.event}" if c.spec.transport != "reply" else None
            )
            channels[key] = _channel(c, key, address)
            door = door_of(c) if c.spec.transport == "stream" else None
            if door is not None:
                channels[f"{key}_door"] = _door_channel(c, key, address, door)
            operations.update(_operations(c, key, door))
    components_schemas["MeshHeaders"] = HEADERS_SCHEMA
    return _document(channels, operations, messages, components_schemas)


def _message(c: type[Contract], key: str) -> dict[str, Any]:
    """The AsyncAPI message of a contract: its body's schema, the envelope in the headers."""
    return {
        "name": c.type_name(),
        "title": c.__name__,
        "summary": c.spec.summary,
        "contentType": "application/json",
        "headers": {"$ref": "#/components/schemas/MeshHeaders"},
        "payload": {"$ref": f"#/components/schemas/{key}"},
    }


def _channel(c: type[Contract], key: str, address: str | None) -> dict[str, Any]:
    """The subject a contract travels on (none for a reply: it goes to the requester's inbox)."""
    return {
        "address": address,
        "description": (c.__doc__ or "").strip().splitlines()[0],
        "messages": {key: {"$ref": f"#/components/messages/{key}"}},
        **(
            {"parameters": {"tenant": {"description": "Tenant id"}, "task": {"description": "Task id"}}}
            if address
            else {}
        ),
        "x-stream": STREAMS.get(c.spec.domain) if c.spec.transport == "stream" else None,
        "x-transport": c.spec.transport,
    }


def _door_channel(c: type[Contract], key: str, address: str | None, door: Door) -> dict[str, Any]:
    """Where tenants hand in a stream contract: they write to no stream (mesh_tenancy.door)."""
    return {
        "address": f"{DOOR_PREFIX}.{address}",
        "description": f"Where a tenant's client sends {c.type_name()}: a core request; {door.service} "
        f"checks it, charges the tenant's quota in {door.stream}, stores it on {address} and answers with "
        "the stream's acknowledgement (JetStream's publish answer), or an error with the refusal's code.",
        "messages": {key: {"$ref": f"#/components/messages/{key}"}},
        "parameters": {"tenant": {"description": "Tenant id"}, "task": {"description": "Task id"}},
        "x-door-keeper": door.service,
        "x-stream": door.stream,
        "x-transport": "request",
    }


def _operations(c: type[Contract], key: str, door: Door | None) -> dict[str, Any]:
    """Who does what with a contract: keeps its door, sends it (a client through the door),
    receives it."""
    operations: dict[str, Any] = {}
    if door is not None:
        operations[f"{door.service}.receive.{key}_door"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}_door"},
            "summary": f"{door.service} keeps the door of {c.type_name()}",
        }
    for producer in c.spec.producers:
        via_door = door is not None and producer == CLIENT
        operations[f"{producer}.send.{key}"] = {
            "action": "send",
            "channel": {"$ref": f"#/channels/{key}_door" if via_door else f"#/channels/{key}"},
            "summary": f"{producer} {'hands in' if via_door else 'publishes'} {c.type_name()}",
        }
    for consumer in c.spec.consumers:
        operations[f"{consumer}.receive.{key}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"{consumer} consumes {c.type_name()}",
        }
    return operations


def _document(
    channels: dict[str, Any], operations: dict[str, Any], messages: dict[str, Any], schemas: dict[str, Any]
) -> dict[str, Any]:
    """The document around the channels, operations and components: what the mesh is, where it runs."""
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "AgentMesh",
            "version": "1.0.0",
            "description": "Event-driven mesh of LLM agent services on NATS JetStream. "
            "Generated from mesh_contracts; do not edit.",
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": "127.0.0.1:4222",
                "protocol": "nats",
                "description": "meshctl up (JWT auth, one identity per service)",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def _dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def rendered() -> dict[Path, str]:
    files = {SCHEMAS / rel: _dump_json(s) for rel, s in schemas().items()}
    files[VOCABULARY] = _dump_json(vocabulary())
    files[typescript.OUTPUT] = typescript.render(schemas())  # the TypeScript client's types
    files[ASYNCAPI] = yaml.safe_dump(asyncapi(), sort_keys=False, width=100)
    return files


def write() -> int:
    for path, text in rendered().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(rendered())} contract artifacts under {ROOT.name}/")
    return 0


# --- compatibility ---------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref and ref.startswith("#/$defs/"):
        found: dict[str, Any] = schema.get("$defs", {}).get(ref.split("/")[-1], {})
        return found
    return node


def _shape(schema: dict[str, Any], node: dict[str, Any]) -> Any:
    """A comparable description of a property's type (ignores docs, examples, bounds)."""
    node = _resolve(schema, node)
    if "anyOf" in node:
        return ("anyOf", tuple(sorted(json.dumps(_shape(schema, n), sort_keys=True) for n in node["anyOf"])))
    if node.get("type") == "array":
        items = node.get("items") or node.get("prefixItems") or {}
        return ("array", _shape(schema, items) if isinstance(items, dict) else "tuple")
    if node.get("type") == "object" and "properties" in node:
        return ("object", node.get("title", ""))
    if "const" in node:
        return ("const", node["const"])
    if "enum" in node:
        return ("enum", tuple(node["enum"]))
    return node.get("type", "any")


def breaking_changes(old: dict[str, Any], new: dict[str, Any], where: str = "") -> list[str]:
    """Reasons ``new`` cannot replace ``old`` without breaking a producer or consumer."""
    problems: list[str] = []

    def compare(o: dict[str, Any], n: dict[str, Any], path: str) -> None:
        oprops, nprops = o.get("properties", {}), n.get("properties", {})
        for name in oprops:
            if name not in nprops:
                problems.append(f"{path}{name}: property removed")
            elif _shape(old, oprops[name]) != _shape(new, nprops[name]):
                problems.append(
                    f"{path}{name}: type changed {_shape(old, oprops[name])} -> {_shape(new, nprops[name])}"
                )
        for name in set(n.get("required", ())) - set(o.get("required", ())):
            problems.append(f"{path}{name}: became required")

    compare(old, new, where)
    for dname, odef in old.get("$defs", {}).items():
        ndef = new.get("$defs", {}).get(dname)
        if ndef is None:
            problems.append(f"{where}$defs.{dname}: definition removed")
        else:
            compare(odef, ndef, f"{where}{dname}.")
    return problems


def _history(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Earlier committed versions of ``path`` (commit, schema); empty outside git."""
    try:
        top = _git_root()
        rel = path.relative_to(top)
        # Pathspecs are relative to the working directory: run from the top of the repository.
        commits = subprocess.run(
            ["git", "log", "--format=%h", "--", str(rel)], cwd=top, capture_output=True, text=True, check=True
        ).stdout.split()
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
        return []
    out = []
    for commit in commits:
        shown = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=top, capture_output=True, text=True)
        if shown.returncode == 0:
            out.append((commit, json.loads(shown.stdout)))
    return out


def _git_root() -> Path:
    top = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(top)


class NoHistory(RuntimeError, ContractsError):
    """The git history the breaking-change check compares against is not here."""


def ensure_history() -> str:
    """Make sure the whole history is here; returns what was done. Raises ``NoHistory``."""
    try:
        top = _git_root()
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        raise NoHistory(
            "not a git checkout: no earlier schemas to compare with (use --no-history for an sdist)"
        ) from exc
    shallow = subprocess.run(
        ["git", "rev-parse", "--is-shallow-repository"], cwd=top, capture_output=True, text=True
    ).stdout.strip()
    if shallow != "true":
        return "full history"
    fetched = subprocess.run(
        ["git", "fetch", "--quiet", "--unshallow", "--no-tags"], cwd=top, capture_output=True, text=True
    )
    if fetched.returncode != 0:
        why = (fetched.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise NoHistory(
            "this clone is shallow and `git fetch --unshallow` failed "
            f"({why}): a breaking change could pass unseen; clone with the full history (fetch-depth: 0)"
        )
    return "fetched the history of a shallow clone"


def check(require_history: bool = True) -> int:
    if require_history:
        try:
            how = ensure_history()
        except NoHistory as exc:
            print(f"contract check FAILED: {exc}", file=sys.stderr)
            return 1
        if how != "full history":
            print(f"contracts: {how}", file=sys.stderr)
    failures: list[str] = []
    for path, text in rendered().items():
        if not path.exists():
            failures.append(f"missing: {path.relative_to(ROOT.parent)} (run `make contracts`)")
        elif path.read_text() != text:
            failures.append(f"drift: {path.relative_to(ROOT.parent)} differs from the models (run `make contracts`)")
    compared = 0
    generated = schemas()
    for rel, new in generated.items():
        for commit, old in _history(SCHEMAS / rel):
            compared += 1
            failures += [f"breaking: {rel} vs {commit}: {p}" for p in breaking_changes(old, new)]
    for major in {int(p.parent.name[1:]) for p in SCHEMAS.glob("v*/*.json")}:
        published = {p.name for p in (SCHEMAS / f"v{major}").glob("*.json")}
        current = {Path(rel).name for rel in generated if rel.startswith(f"v{major}/")}
        failures += [f"breaking: v{major}/{name} was published and is gone" for name in published - current]
    if failures:
        print("\n".join(failures), file=sys.stderr)
        print(f"contract check FAILED ({len(failures)} problem(s))", file=sys.stderr)
        return 1
    print(f"contracts OK: {len(generated)} schemas, no drift, {compared} historical version(s) compatible")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["write"]:
        return write()
    if args == ["check"]:
        return check()
    if args == ["check", "--no-history"]:
        return check(require_history=False)
    print(f"usage: python -m {_pkg}.generate write | check [--no-history]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
