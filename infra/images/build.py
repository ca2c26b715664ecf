"""`make images`: every service image (and meshctl's) built on a local Docker engine, from a
pinned base, with nothing pulled.

    .venv/bin/python infra/images/build.py                       # base (once), wheels, 8 images
    .venv/bin/python infra/images/build.py --only worker,rag     # some of them
    .venv/bin/python infra/images/build.py --base python:3.11-slim@sha256:...   # a registry base
    .venv/bin/python infra/images/build.py --rebuild-base        # debootstrap the base again

Three steps:

1. **The base.** Where a registry can be reached, pass ``--base IMAGE@sha256:...``. Our machines
   reach none, so by default the base is Debian bookworm made by ``debootstrap --variant=minbase``
   from Debian's packages (python3, python3-venv, ca-certificates), stripped of docs and apt
   lists, and imported as ``agentmesh/base:bookworm``. Its package list (``dpkg-query``) is
   labelled on the image and written next to the build report. It is built once and reused; the
   service images are built ``FROM`` its image id, never a tag, so a base rebuilt halfway cannot
   slip into some of them.
2. **A wheelhouse.** ``pip wheel`` on this machine (with its own index settings, which never enter
   an image or the repository) into ``infra/images/wheels/``, pinned by constraints.txt.
3. **The images**, from infra/images/service/Dockerfile (``SERVICE=...``) and
   infra/images/meshctl/Dockerfile, with ``PIP_OFFLINE=1`` and ``--network none``: pip installs
   from the wheelhouse alone, so what an image holds is exactly what was pinned. The legacy
   builder is used: BuildKit would pull its Dockerfile frontend.

It prints one line per image (size, build time, id) and writes ``build/images/report.json``.
Run as root for debootstrap; an engine must answer (``bash .ci/docker-up.sh`` starts one).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "infra" / "images"))

import local_packages  # noqa: E402  (a script beside this one, not a package)
from packaging.utils import canonicalize_name  # noqa: E402

from mesh_contracts import SERVICES  # noqa: E402

IMAGES = (*SERVICES, "edge", "a2a", "meshctl")  # the gateways (HTTP, A2A): in no stream, so not SERVICES
BASE_TAG = "agentmesh/base:bookworm"
SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates")
WHEELS = ROOT / "infra" / "images" / "wheels"
REPORT = ROOT / "build" / "images" / "report.json"
# Dependencies the base's interpreter needs and this machine's does not (a marker such as
# `python_full_version < "3.11.3"`: Debian's python3 is 3.11.2), pinned here since constraints.txt
# is the venv's own freeze.
BASE_CONSTRAINTS = ROOT / "infra" / "images" / "base-constraints.txt"
LABEL_PACKAGES = "org.agentmesh.base.packages-sha256"
# Removed from the base after debootstrap: nothing at run time reads them.
STRIP = (
    "dev",  # the engine gives every container its own /dev
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
)


class BuildError(Exception):
    """A step failed; the message says which and why, in one line."""


def tag_of(image: str, tag: str) -> str:
    return f"agentmesh/{image}:{tag}"


# --------------------------------------------------------------------------- engine


def engine():
    try:
        import docker
    except ImportError as e:
        raise BuildError("the docker SDK is not installed: run `make setup`") from e
    import gc
    import warnings

    client = None
    try:
        client = docker.from_env(timeout=600)
        client.ping()
        return client
    except Exception as e:  # noqa: BLE001 - any failure at all means no usable engine
        failure = type(e).__name__
    # The SDK's failed handshake leaves its socket open; collect it here, once the exception
    # (whose traceback holds it) is gone, where it is known and harmless.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        if client is not None:
            client.close()
        client = None
        gc.collect()
    raise BuildError(f"no Docker engine answers ({failure}): start one with `bash .ci/docker-up.sh`")


# --------------------------------------------------------------------------- base


def debian_mirror(apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses (``$DEBIAN_MIRROR`` wins): the base comes from
    the same place as the machine's own packages, and no host is written into the repository."""
    if mirror := os.environ.get("DEBIAN_MIRROR"):
        return mirror
    sources = apt / "sources.list.d" / "debian.sources"
    if sources.is_file():
        for block in sources.read_text().split("\n\n"):
            if re.search(rf"^Suites:.*\b{SUITE}\b", block, re.M) and "security" not in block:
                if m := re.search(r"^URIs:\s*(\S+)", block, re.M):
                    return m.group(1)
    listing = apt / "sources.list"
    if listing.is_file():
        for line in listing.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == SUITE:
                return parts[1]
    raise BuildError(f"no Debian {SUITE} mirror in this machine's apt sources: set DEBIAN_MIRROR")


def packages_of(rootfs: Path) -> str:
    out = subprocess.run(
        ["dpkg-query", f"--admindir={rootfs}/var/lib/dpkg", "-W", "-f", "${Package}=${Version}\n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "".join(sorted(out.splitlines(keepends=True)))


def build_base(client, report: dict) -> str:
    """debootstrap a minimal bookworm with python3 into a scratch folder and import it."""
    if os.geteuid() != 0:
        raise BuildError("debootstrap needs root: run as root, or pass --base IMAGE@sha256:... of a registry image")
    if shutil.which("debootstrap") is None:
        if shutil.which("apt-get") is None:
            raise BuildError("debootstrap is not installed and apt-get is not available")
        print("images: installing debootstrap (apt-get)", flush=True)
        install = ["apt-get", "install", "-y", "-qq", "debootstrap"]
        if subprocess.run(install, stdin=subprocess.DEVNULL, check=False).returncode != 0:
            # a machine whose package lists were never fetched
            subprocess.run(["apt-get", "update", "-qq"], stdin=subprocess.DEVNULL, check=False)
            if subprocess.run(install, stdin=subprocess.DEVNULL, check=False).returncode != 0:
                raise BuildError("apt-get could not install debootstrap")
    mirror = debian_mirror()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="agentmesh-base-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        log = Path(scratch) / "debootstrap.log"
        cmd = ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs), mirror]
        print(f"images: debootstrap {SUITE} (minbase + {', '.join(BASE_PACKAGES)})", flush=True)
        with log.open("w") as fh:
            done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, check=False)
        if done.returncode != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-5:]
            raise BuildError(f"debootstrap failed ({done.returncode}): {' | '.join(tail)}")
        packages = packages_of(rootfs)
        for rel in STRIP:
            target = rootfs / rel
            if target.is_dir():
                shutil.rmtree(target)
                target.mkdir(parents=True)
        archive = Path(scratch) / "rootfs.tar"
        with tarfile.open(archive, "w") as tar:
            tar.add(rootfs, arcname=".", filter=_numeric_owner)
        digest = hashlib.sha256(packages.encode()).hexdigest()
        image = client.api.import_image_from_file(
            str(archive),
            repository=BASE_TAG.split(":")[0],
            tag=BASE_TAG.split(":")[1],
            changes=[
                f"LABEL {LABEL_PACKAGES}={digest} org.opencontainers.image.title=agentmesh-base",
                "ENV LANG=C.UTF-8",
                'CMD ["/bin/bash"]',
            ],
        )
        del image
    report["base_built_s"] = round(time.monotonic() - started, 1)
    return packages


def _numeric_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uname = info.gname = ""
    return info


def resolve_base(client, args: argparse.Namespace, report: dict) -> str:
    """The base's image id (``sha256:...``), building it first when needed."""
    import docker.errors

    if args.base:
        try:
            image = client.images.get(args.base)
        except docker.errors.ImageNotFound:
            print(f"images: pulling {args.base}", flush=True)
            try:
                image = client.images.pull(args.base)
            except docker.errors.APIError as e:
                raise BuildError(f"base {args.base} is not here and cannot be pulled: {e.explanation}") from e
        report["base"] = {"ref": args.base, "id": image.id}
        return image.id
    packages = None
    if args.rebuild_base:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(BASE_TAG)
    try:
        image = client.images.get(BASE_TAG)
        print(f"images: base {BASE_TAG} {image.id[7:19]} (kept; --rebuild-base makes it again)", flush=True)
    except docker.errors.ImageNotFound:
        packages = build_base(client, report)
        image = client.images.get(BASE_TAG)
        print(f"images: base {BASE_TAG} {image.id[7:19]} built in {report['base_built_s']} s", flush=True)
    if packages is None:
        packages = _packages_in(client, image.id)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    (REPORT.parent / "base-packages.txt").write_text(packages)
    report["base"] = {
        "ref": BASE_TAG,
        "id": image.id,
        "size_mb": round(image.attrs["Size"] / 1e6, 1),
        "packages": len(packages.splitlines()),
        "packages_sha256": image.labels.get(LABEL_PACKAGES, ""),
    }
    return image.id


def _packages_in(client, image_id: str) -> str:
    out = client.containers.run(
        image_id,
        ["dpkg-query", "-W", "-f", "${Package}=${Version}\n"],
        remove=True,
        network_mode="none",
    )
    return "".join(sorted(out.decode().splitlines(keepends=True)))


# --------------------------------------------------------------------------- wheels


def local_names() -> set[str]:
    return {canonicalize_name(name) for name in local_packages.local()}


def python_of(client, image_id: str) -> str:
    out = client.containers.run(
        image_id,
        ["python3", "-c", "import platform; print(platform.python_version())"],
        remove=True,
        network_mode="none",
    )
    return out.decode().strip()


def _requirements(wheel: Path) -> list[str]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def missing_for(python: str, no_deps: set[str], wheels: Path = WHEELS) -> dict[str, str]:
    """Requirements of the wheels here that ``python`` (the base's interpreter) needs and no wheel
    here provides: name -> requirement. Extras are not followed (the images install none), nor
    what a package installed with ``--no-deps`` declares."""
    from packaging.requirements import Requirement

    env = {"python_full_version": python, "python_version": ".".join(python.split(".")[:2]), "extra": ""}
    have = {canonicalize_name(w.name.split("-")[0]) for w in wheels.glob("*.whl")} | {
        canonicalize_name(n) for n in local_names()
    }
    out = {}
    for wheel in wheels.glob("*.whl"):
        if canonicalize_name(wheel.name.split("-")[0]) in no_deps:
            continue
        for line in _requirements(wheel):
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if name not in have and (req.marker is None or req.marker.evaluate(env)):
                out[name] = line
    return out


def add_for_base(python: str, report: dict) -> None:
    """Wheels the base's interpreter needs beyond this machine's (to a fixed point), each pinned in
    infra/images/base-constraints.txt."""
    pins = {}
    for line in BASE_CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            pins[canonicalize_name(line.split("==")[0])] = line.strip()
    # every image's, not only those built now: the wheelhouse keeps what earlier runs put there
    no_deps = {canonicalize_name(n) for image in IMAGES for n in install_no_deps(image)}
    added = []
    while missing := missing_for(python, no_deps):
        unpinned = sorted(set(missing) - set(pins))
        if unpinned:
            raise BuildError(
                f"the base's python {python} needs {', '.join(missing[n] for n in unpinned)}: "
                f"pin it in {BASE_CONSTRAINTS.relative_to(ROOT)} (name==version)"
            )
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps"]
        cmd += ["--only-binary=:all:", "--python-version", python, "-d", str(WHEELS)]
        cmd += [pins[n] for n in sorted(missing)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"pip download failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        added += [pins[n] for n in sorted(missing)]
    report["wheels_for_base"] = added


def folder_of(image: str) -> Path:
    return ROOT / ("libs/meshctl" if image == "meshctl" else f"services/{image}")


def install_no_deps(image: str) -> list[str]:
    return local_packages.project(folder_of(image)).get("tool", {}).get("agentmesh", {}).get("install-no-deps", [])


def third_party(images: list[str]) -> tuple[list[str], list[str]]:
    """What the images' local packages declare beyond themselves: (requirements, no-deps names)."""
    ours = local_names()
    requirements: list[str] = []
    no_deps: list[str] = []
    for image in images:
        for folder in local_packages.closure(folder_of(image)):
            for req in local_packages.project(folder)["project"].get("dependencies", []):
                if canonicalize_name(local_packages.requirement_name(req)) not in ours and req not in requirements:
                    requirements.append(req)
        no_deps += [n for n in install_no_deps(image) if n not in no_deps]
    return requirements, no_deps


def build_wheels(images: list[str], report: dict) -> None:
    """Every third-party distribution the images install, as wheels, pinned by constraints.txt.
    The repository's own packages are not among them: the Dockerfiles install those from their
    folders, so what an image runs is the source it was built from."""
    started = time.monotonic()
    WHEELS.mkdir(parents=True, exist_ok=True)
    requirements, no_deps = third_party(images)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(WHEELS)]
    pip += ["-c", str(ROOT / "constraints.txt")]
    steps = [[*pip, "setuptools", "wheel", *requirements]]
    if no_deps:
        steps.append([*pip, "--no-deps", *no_deps])
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise BuildError(f"pip wheel failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    wheels = sorted(WHEELS.glob("*.whl"))
    report["wheels"] = {"count": len(wheels), "mb": round(sum(w.stat().st_size for w in wheels) / 1e6, 1)}
    report["wheels_s"] = round(time.monotonic() - started, 1)
    print(f"images: wheelhouse {len(wheels)} wheels, {report['wheels']['mb']} MB, {report['wheels_s']} s", flush=True)


# --------------------------------------------------------------------------- images


def build_image(client, image: str, base_id: str, tag: str) -> dict:
    import docker.errors

    dockerfile = "infra/images/meshctl/Dockerfile" if image == "meshctl" else "infra/images/service/Dockerfile"
    buildargs = {"PYTHON_IMAGE": base_id, "PIP_OFFLINE": "1"}
    if image != "meshctl":
        buildargs["SERVICE"] = image
    started = time.monotonic()
    log: list[str] = []
    try:
        for chunk in client.api.build(
            path=str(ROOT),
            dockerfile=dockerfile,
            tag=tag_of(image, tag),
            buildargs=buildargs,
            network_mode="none",  # the wheelhouse is all there is: nothing is fetched
            pull=False,
            rm=True,
            forcerm=True,
            decode=True,
            labels={"org.opencontainers.image.title": f"agentmesh-{image}"},
        ):
            if "stream" in chunk:
                log.append(chunk["stream"])
            if "error" in chunk:
                tail = "".join(log).strip().splitlines()[-8:]
                raise BuildError(f"{image}: {chunk['error'].strip()}\n    " + "\n    ".join(tail))
    except docker.errors.APIError as e:
        raise BuildError(f"{image}: {e.explanation}") from e
    built = client.images.get(tag_of(image, tag))
    return {
        "tag": tag_of(image, tag),
        "id": built.id,
        "size_mb": round(built.attrs["Size"] / 1e6, 1),
        "build_s": round(time.monotonic() - started, 1),
        "user": built.attrs["Config"].get("User", ""),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="images", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated images (default: all of " + ", ".join(IMAGES) + ")")
    parser.add_argument("--tag", default="local", help="the tag every image gets (default: local)")
    parser.add_argument("--base", default="", help="a registry base by digest instead of the debootstrap one")
    parser.add_argument("--rebuild-base", action="store_true", help="debootstrap the base again")
    args = parser.parse_args(argv)
    images = [i.strip() for i in args.only.split(",") if i.strip()] or list(IMAGES)
    if unknown := [i for i in images if i not in IMAGES]:
        parser.error(f"unknown image {unknown[0]!r}: choose from {', '.join(IMAGES)}")
    report: dict = {"images": {}}
    started = time.monotonic()
    try:
        client = engine()
        base_id = resolve_base(client, args, report)
        report["base"]["python"] = python = python_of(client, base_id)
        build_wheels(images, report)
        add_for_base(python, report)
        for image in images:
            print(f"images: building {tag_of(image, args.tag)}", flush=True)
            report["images"][image] = built = build_image(client, image, base_id, args.tag)
            print(
                f"images: {built['tag']:<32} {built['size_mb']:>7.1f} MB {built['build_s']:>6.1f} s"
                f"  {built['id'][7:19]}  user {built['user'] or 'root'}",
                flush=True,
            )
    except BuildError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    report["total_s"] = round(time.monotonic() - started, 1)
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(report, indent=2) + "\n")
    base = report["base"]
    print(
        f"images: {len(images)} image(s) in {report['total_s']} s from base {base['id'][7:19]}; report {REPORT.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
