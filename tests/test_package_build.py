"""The package as built: the wheel holds every subpackage of the source tree, imports from itself, and carries the
ONNX bundle and samples a station needs but not the torch weights the bundle was exported from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder of each top-level subpackage (pyproject's [tool.setuptools.package-dir]).
BUILD_IGNORES = (".git", ".venv", ".whl", "build", "dist", "out", "*.egg-info", "__pycache__", ".*_cache")
FOLDERS = {
    "unidg": "unidg",
    "unidg.train": "train",
    "unidg.export": "export",
    "unidg.runtime": "runtime",
    "unidg.calib": "calib",
}


def source_packages() -> list[str]:
    """Every folder of the source tree with an __init__.py, as its package name."""
    names = []
    for package, folder in FOLDERS.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            relative = init.parent.relative_to(ROOT / folder)
            names.append(".".join([package, *relative.parts]))
    return sorted(names)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools reuses an existing build/ folder, whose stale files would end up in the wheel.
    source = out / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_IGNORES))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("unidg-*.whl")
    return path


def test_the_wheel_holds_every_subpackage_and_imports_from_itself(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    packaged = sorted(n[: -len("/__init__.py")].replace("/", ".") for n in names if n.endswith("/__init__.py"))
    missing = sorted(set(source_packages()) - set(packaged))
    assert not missing, f"not in the wheel (add them to [tool.setuptools] in pyproject.toml): {missing}"
    code = (
        "import importlib, sys\n"
        f"for name in {source_packages()!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(tmp_path / 'site')!r}), (name, module.__file__)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_the_wheel_carries_the_bundle_and_samples_but_not_the_torch_weights(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    assets = "unidg/runtime/assets/"
    bundle = {Path(n).name for n in names if n.startswith(assets + "unidg-nano-bundle/")}
    assert {"manifest.json", "step.onnx", "vae_encoder.onnx", "vae_decoder.onnx", "image_encoder.onnx"} <= bundle
    assert any(n.startswith(assets + "samples/") and n.endswith("samples.json") for n in names)
    text = {n.removeprefix(assets + "unidg-nano-text-bundle/") for n in names if "unidg-nano-text-bundle/" in n}
    assert {"manifest.json", "step.onnx", "clip_text.onnx", "t5_text.onnx", "tokenizer_2/tokenizer.json"} <= text
    assert not [n for n in names if n.startswith(assets + "unidg-nano/")], "the torch weights are in the wheel"
    assert not [n for n in names if n.endswith(".safetensors")]
    assert "unidg/runtime/capi/unidg.h" in names


def test_source_packages_sees_nested_packages() -> None:
    assert {"unidg.runtime.backends", "unidg.export.plugins", "unidg.runtime.capi"} <= set(source_packages())
