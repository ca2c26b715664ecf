"""infra/pin_images.py: the release pins every image by digest, and nothing else in the overlay moves."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mesh_testing.scripts import load_script

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
pin_images = load_script(ROOT / "infra" / "pin_images.py")

IMAGES = ("planner", "worker", "checker", "rag", "tool-executor", "budget", "edge", "a2a", "meshctl")
D = {name: "sha256:" + f"{i:x}" * 64 for i, name in enumerate(IMAGES, start=1)}


def _overlay(tmp_path: Path) -> Path:
    overlay = tmp_path / "production"
    overlay.mkdir()
    text = (ROOT / "infra/k8s/overlays/production/kustomization.yaml").read_text()
    (overlay / "kustomization.yaml").write_text(text)
    return overlay


def test_the_production_overlay_is_pinned_by_digest_and_nothing_else_changes(tmp_path):
    overlay = _overlay(tmp_path)
    before = (overlay / "kustomization.yaml").read_text()
    assert pin_images.main([str(overlay), "--digests", __import__("json").dumps(D)]) == 0
    after = (overlay / "kustomization.yaml").read_text()
    doc, old = yaml.safe_load(after), yaml.safe_load(before)
    assert {i["name"]: i["digest"] for i in doc["images"]} == {f"agentmesh/{k}": v for k, v in D.items()}
    assert all("newTag" not in i and "newName" not in i for i in doc["images"]), "no tag, no registry committed"
    assert {k: v for k, v in doc.items() if k != "images"} == {k: v for k, v in old.items() if k != "images"}
    assert [line for line in after.splitlines() if line.startswith("#")] == [
        line for line in before.splitlines() if line.startswith("#")
    ], "comments kept"

    assert pin_images.main([str(overlay), "--registry", "registry.example.invalid/team"]) == 0
    doc = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    worker = next(i for i in doc["images"] if i["name"] == "agentmesh/worker")
    assert worker == {"name": "agentmesh/worker", "digest": D["worker"],
                      "newName": "registry.example.invalid/team/agentmesh/worker"}  # fmt: skip


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--digests", '{"worker": "sha256:' + "a" * 64 + '"}'], "no digest for: a2a, budget, checker"),
        (["--digests", "{**}"], "--digests is not JSON"),
        (["--digests", '{"nope": "sha256:' + "a" * 64 + '"}'], "no such image in the overlay: nope"),
        (["--registry", "https://r.example.invalid"], "without a scheme"),
        ([], "nothing to do"),
    ],
)
def test_a_pin_that_cannot_be_made_is_one_line_and_changes_nothing(tmp_path, capsys, args, error):
    overlay = _overlay(tmp_path)
    before = (overlay / "kustomization.yaml").read_text()
    assert pin_images.main([str(overlay), *args]) == 2
    assert error in capsys.readouterr().err
    assert (overlay / "kustomization.yaml").read_text() == before


def test_a_tag_is_not_a_digest(tmp_path, capsys):
    overlay = _overlay(tmp_path)
    digests = {**D, "worker": "latest"}
    assert pin_images.main([str(overlay), "--digests", __import__("json").dumps(digests)]) == 2
    assert "not a sha256 digest for: worker" in capsys.readouterr().err


def test_an_overlay_without_an_images_list_gets_one(tmp_path):
    overlay = tmp_path / "staging"
    overlay.mkdir()
    text = (ROOT / "infra/k8s/overlays/staging/kustomization.yaml").read_text()
    assert "images:" not in text.replace("# ", "")
    (overlay / "kustomization.yaml").write_text(text)
    assert pin_images.main([str(overlay), "--digests", __import__("json").dumps(D), "--registry", "r.invalid"]) == 0
    doc = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert {i["name"]: (i["digest"], i["newName"]) for i in doc["images"]} == {
        f"agentmesh/{k}": (v, f"r.invalid/agentmesh/{k}") for k, v in D.items()
    }
    assert doc["resources"] == yaml.safe_load(text)["resources"]
