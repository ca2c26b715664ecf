"""What `make deploy-check` validates rendered objects against: the Kubernetes schemas for core
kinds (kubernetes-validate, strict: unknown fields are errors) and the CRD schemas vendored in
infra/k8s/schemas/ for KEDA's and cert-manager's, made strict the same way.

The vendored form is made here too (``vendor_crd``, behind ``deploy_check.py vendor-crd``): a
CRD's served versions' openAPIV3Schema, without descriptions and status, under a header naming
where it came from.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEMAS = Path(__file__).resolve().parent / "k8s" / "schemas"
# The oldest and the newest Kubernetes the manifests are checked against (kubernetes-validate
# bundles 1.25 to 1.37): a field too new for the oldest, or gone from the newest, fails.
K8S_VERSIONS = ("1.30.0", "1.37.0")


def _drop_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_drop_descriptions(v) for v in node]
    return node


def vendor_crd(crd: dict[str, Any], source: str) -> str:
    """The vendored form of ``crd``: each served version's openAPIV3Schema, without descriptions
    and without ``status`` (manifests never set it), under a header naming ``source``."""
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    docs = []
    for version in crd["spec"]["versions"]:
        if not version.get("served", True):
            continue
        schema = _drop_descriptions(version["schema"]["openAPIV3Schema"])
        schema.get("properties", {}).pop("status", None)
        docs.append({"apiVersion": f"{group}/{version['name']}", "kind": kind, "source": source, "schema": schema})
    header = (
        f"# openAPIV3Schema of {kind} ({group}), vendored from\n"
        f"#   {source}\n"
        "# by `python infra/deploy_check.py vendor-crd` (descriptions and status dropped, nothing else\n"
        "# changed). Do not edit: vendor it again from the new tag when the pinned version moves.\n"
    )
    return header + "---\n".join(yaml.safe_dump(d, sort_keys=False, width=100) for d in docs)


def strict_schema(schema: Any) -> Any:
    """``schema`` (a structural CRD schema) as the API server's strict field validation reads it:
    an object with ``properties`` accepts no other field unless it says so, and ``nullable`` allows
    null (an OpenAPI keyword that JSON Schema does not know)."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            node["additionalProperties"] = False
        if node.get("nullable") and isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
        for value in node.values():
            walk(value)

    walk(schema)
    return schema


@dataclass
class CrdSchemas:
    """The vendored CRD schemas by (apiVersion, kind), with the source each came from."""

    schemas: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    sources: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def load(cls, directory: Path = SCHEMAS) -> CrdSchemas:
        out = cls()
        for path in sorted(directory.glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc:
                    key = (doc["apiVersion"], doc["kind"])
                    out.schemas[key] = strict_schema(doc["schema"])
                    out.sources[key] = doc["source"]
        return out

    def groups(self) -> set[str]:
        return {api.split("/")[0] for api, _ in self.schemas}


# --- validating an object --------------------------------------------------------------------------


def _path(error: Any) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(root)"


def validate_crd_object(doc: dict[str, Any], crds: CrdSchemas) -> list[str]:
    """Errors of a custom resource against its vendored schema, each naming the field."""
    import jsonschema

    schema = crds.schemas.get((doc.get("apiVersion", ""), doc.get("kind", "")))
    if schema is None:
        return [f"no vendored schema for {doc.get('apiVersion')} {doc.get('kind')} (infra/k8s/schemas)"]
    validator = jsonschema.Draft7Validator(schema)
    return [f"{_path(e)}: {e.message}" for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path))]


def validate_core_object(doc: dict[str, Any], versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Errors of a built-in kind against the Kubernetes schemas (strict: unknown fields are errors)."""
    import kubernetes_validate

    errors = []
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"Kubernetes {version}: {_path(e)}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"Kubernetes {version}: no such kind: {doc.get('apiVersion')} {doc.get('kind')}")
    return errors


def validate_object(doc: dict[str, Any], crds: CrdSchemas, versions: Iterable[str] = K8S_VERSIONS) -> list[str]:
    """Errors of one rendered object, by the schema its apiVersion group calls for."""
    group = doc.get("apiVersion", "").split("/")[0] if "/" in doc.get("apiVersion", "") else ""
    if group in crds.groups():
        return validate_crd_object(doc, crds)
    return validate_core_object(doc, versions)
