"""Bundle integrity: the fingerprint covers the manifest's settings, a hand-edited manifest is refused by every reader
that verifies, and `unidg export trtexec` and `unidg export check` re-hash the bundle they read."""

from __future__ import annotations

import json
import shutil

import pytest
from export_fixtures import nano_bundle
from runtime_fixtures import make_toy_bundle, rewrite_manifest

from unidg.cli import main
from unidg.core.manifest import MANIFEST_FILE
from unidg.runtime.bundle import BundleError, load_bundle


@pytest.fixture
def bundle(tmp_path):
    return make_toy_bundle(tmp_path / "bundle", resolution=64, steps=4)


def _set_alpha_by_hand(folder, alpha: float) -> None:
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["metadata"]["settings"]["alpha"] = alpha
    (folder / MANIFEST_FILE).write_text(json.dumps(data, indent=2))


def test_the_fingerprint_covers_the_manifest_settings(bundle):
    before = load_bundle(bundle)
    rewrite_manifest(bundle, lambda meta: meta["settings"].update(alpha=50.0))  # files untouched, re-signed
    after = load_bundle(bundle)
    assert after.files == before.files and after.settings.alpha == 50.0
    assert after.fingerprint != before.fingerprint  # batch resume and outputs tell the two apart


def test_a_hand_edited_manifest_is_refused_when_verified(bundle):
    _set_alpha_by_hand(bundle, 50.0)
    with pytest.raises(BundleError, match=r"metadata does not match its recorded sha256.*re-create"):
        load_bundle(bundle)
    assert load_bundle(bundle, verify=False).settings.alpha == 50.0  # only the explicit opt-out skips it


def test_a_manifest_without_the_recorded_metadata_hash_still_loads(bundle):
    # Bundles exported before the metadata hash existed (the shipped demo bundle among them) stay readable; their
    # fingerprint covers the settings all the same.
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    del data["metadata_sha256"]
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))
    fingerprint = load_bundle(bundle).fingerprint
    _set_alpha_by_hand(bundle, 50.0)
    assert load_bundle(bundle).fingerprint != fingerprint


@pytest.mark.parametrize("command", ["trtexec", "check"])
@pytest.mark.parametrize("damage", ["graph", "manifest"])
def test_export_trtexec_and_check_refuse_a_changed_bundle(tmp_path, capsys, damage, command):
    copy = tmp_path / "bundle"
    shutil.copytree(nano_bundle(), copy)
    if damage == "graph":
        with open(copy / "step.onnx", "r+b") as handle:  # same size, other bytes
            handle.seek(100)
            byte = handle.read(1)
            handle.seek(100)
            handle.write(bytes([byte[0] ^ 0xFF]))
    else:
        rewrite_manifest(copy, lambda meta: None)  # re-sign first: the shipped manifest predates the hash
        _set_alpha_by_hand(copy, 50.0)
    assert main(["export", command, "--bundle", str(copy), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert ("step.onnx does not match" if damage == "graph" else "metadata does not match") in error, error
    assert not (tmp_path / "out").exists()
