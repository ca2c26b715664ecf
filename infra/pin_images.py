"""Pin an overlay's images by digest: what the release workflow promotes, and what a deploy applies.

    python infra/pin_images.py infra/k8s/overlays/production --digests '{"worker": "sha256:..."}'
    python infra/pin_images.py infra/k8s/overlays/production --registry "$REGISTRY"   # at apply time

``--digests`` (a JSON object, image -> digest, as release.yml's deploy-staging job resolves them)
sets each image's digest and removes any tag: the overlay then names exactly the bytes that
passed staging. ``--registry`` sets where they are pulled from (``<registry>/agentmesh/<image>``);
the release workflow's promotion pull request commits digests only, so the repository names no
registry, and the registry is supplied where the overlay is applied. Every image the overlay
lists must be given a digest (a release is all or nothing); an unknown image is an error.
Needs no kustomize: it edits the ``images:`` list of kustomization.yaml and nothing else.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
PREFIX = "agentmesh/"


class PinError(ValueError):
    """A pin that cannot be made; one line for the operator."""


def pin(text: str, digests: dict[str, str] | None = None, registry: str = "") -> str:
    """``text`` (a kustomization.yaml) with its images pinned; everything else as it was."""
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict):
        raise PinError("not a kustomization")
    images = doc.get("images")
    added = not images
    if added:  # an overlay without an images list (staging) gets one for the images given
        if not digests:
            raise PinError("the overlay lists no images, and no digests name them")
        images = [{"name": f"{PREFIX}{name}"} for name in digests]
    names = [i["name"] for i in images]
    if digests is not None:
        short = {n.removeprefix(PREFIX) for n in names}
        unknown = sorted(set(digests) - short)
        missing = sorted(short - set(digests))
        if unknown:
            raise PinError(f"no such image in the overlay: {', '.join(unknown)}")
        if missing:
            raise PinError(f"no digest for: {', '.join(missing)} (a release pins every image)")
        bad = sorted(k for k, v in digests.items() if not DIGEST.fullmatch(v))
        if bad:
            raise PinError(f"not a sha256 digest for: {', '.join(bad)}")
    if registry and (registry.endswith("/") or "://" in registry or not registry.strip()):
        raise PinError(f"registry must be host[:port][/path], without a scheme or trailing slash: {registry!r}")
    for image in images:
        short = image["name"].removeprefix(PREFIX)
        if digests is not None:
            image["digest"] = digests[short]
            image.pop("newTag", None)
        if registry:
            image["newName"] = f"{registry}/{image['name']}"
    block = "images:\n" + "".join(
        "  - {" + ", ".join(f"{k}: {json.dumps(v)}" if k == "digest" else f"{k}: {v}" for k, v in i.items()) + "}\n"
        for i in images
    )
    if added:
        out = text.rstrip("\n") + "\n" + block
        if yaml.safe_load(out)["images"] != images:
            raise PinError("could not add an images block")
        return out
    # Replace the images block in place, keeping the file's comments and order.
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("images:"))
    end = start + 1
    while end < len(lines) and (lines[end].startswith((" ", "\t", "-")) or not lines[end].strip()):
        end += 1
    comment = lines[start][len("images:") :].strip()
    if comment:
        block = block.replace("images:\n", f"images:  {comment}\n", 1)
    out = "".join(lines[:start]) + block + "".join(lines[end:])
    if yaml.safe_load(out)["images"] != images:
        raise PinError("could not rewrite the images block in place")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overlay", type=Path, help="a folder holding kustomization.yaml")
    ap.add_argument("--digests", default=None, help='JSON: {"worker": "sha256:...", ...} for every image')
    ap.add_argument("--registry", default="", help="where the images are pulled from (applied, not committed)")
    args = ap.parse_args(argv)
    path = args.overlay / "kustomization.yaml"
    try:
        if args.digests is None and not args.registry:
            raise PinError("nothing to do: give --digests, --registry or both")
        try:
            digests = json.loads(args.digests) if args.digests is not None else None
        except json.JSONDecodeError as exc:
            raise PinError(f"--digests is not JSON: {exc}") from None
        if digests is not None and not (
            isinstance(digests, dict) and all(isinstance(v, str) for v in digests.values())
        ):
            raise PinError("--digests must be a JSON object of image -> digest")
        path.write_text(pin(path.read_text(), digests, args.registry))
    except (PinError, OSError) as exc:
        print(f"pin_images: {exc}", file=sys.stderr)
        return 2
    print(f"pinned {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
