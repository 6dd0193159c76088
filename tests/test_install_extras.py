"""What a station installs: `unidg[gpu]` resolves to exactly one onnxruntime package (onnxruntime-gpu), the dev
install and the lock to exactly onnxruntime, and a station with two onnxruntime packages is refused at start with the
fix. The resolution runs `pip install --dry-run --report` against the package index (skipped when unreachable)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from unidg.runtime.backends import BackendUnavailable, backend_class
from unidg.runtime.backends.onnxruntime_packages import (
    ONNXRUNTIME_PACKAGES,
    installed_onnxruntime_packages,
    onnxruntime_install_problem,
)
from unidg.train.config import _toml_loads

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = _toml_loads((ROOT / "pyproject.toml").read_text())


def _index_reachable(host: str = "pypi.org") -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        return False
    return True


def _metadata_only_copy(folder: Path) -> Path:
    """pyproject.toml, the README it names and an empty folder per package: all pip needs for the metadata."""
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    shutil.copy(ROOT / "README.md", folder / "README.md")
    setuptools = PYPROJECT["tool"]["setuptools"]
    for package in setuptools["packages"]:
        parts = package.split(".")
        # The longest package-dir entry that is a prefix of the package (unidg.core lives in unidg/core).
        depth = max(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in setuptools["package-dir"])
        source = Path(setuptools["package-dir"][".".join(parts[:depth])], *parts[depth:])
        (folder / source).mkdir(parents=True, exist_ok=True)
        (folder / source / "__init__.py").touch()
    return folder


def resolve(extras: str, folder: Path) -> dict[str, str]:
    """{package: version} pip would install for `unidg[extras]` on a clean station (nothing installed counted)."""
    report = folder / "report.json"
    spec = f"{_metadata_only_copy(folder / 'unidg')}[{extras}]"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed"]
    done = subprocess.run([*command, "--report", str(report), spec], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in installs}


def test_gpu_extra_resolves_to_exactly_one_onnxruntime(tmp_path):
    if not _index_reachable():
        pytest.skip("the package index (pypi.org) is unreachable: cannot resolve unidg[gpu]")
    resolved = resolve("gpu", tmp_path)
    print("\nunidg[gpu] installs:", " ".join(f"{name}=={version}" for name, version in sorted(resolved.items())))
    assert [name for name in resolved if name in ONNXRUNTIME_PACKAGES] == ["onnxruntime-gpu"]


def test_cpu_and_dev_installs_get_exactly_cpu_onnxruntime():
    extras = PYPROJECT["project"]["optional-dependencies"]
    runtime = [r for r in PYPROJECT["project"]["dependencies"] if r.startswith("onnxruntime")]
    assert not runtime, "onnxruntime belongs to the [cpu] / [gpu] extras, not the base install"
    # The floor the runtime names when a graph needs a newer onnxruntime is the one the extras ask for.
    from unidg.runtime.backends.onnxruntime_backend import MIN_ONNXRUNTIME

    assert extras["cpu"] == [f"onnxruntime>={MIN_ONNXRUNTIME}"] and extras["gpu"] == [
        f"onnxruntime-gpu>={MIN_ONNXRUNTIME}"
    ]
    assert extras["dev"][0].startswith("unidg[cpu,")  # ./run and CI install .[dev]
    locked = [line.split("==")[0] for line in (ROOT / "requirements.lock").read_text().splitlines()]
    assert [name for name in locked if name in ONNXRUNTIME_PACKAGES] == ["onnxruntime"]
    assert list(installed_onnxruntime_packages()) == ["onnxruntime"] and onnxruntime_install_problem() is None


def _fake_distribution(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")


def test_a_station_with_two_onnxruntime_packages_is_refused_at_start(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_distribution(site, "onnxruntime", "1.32.0")
    _fake_distribution(site, "onnxruntime-gpu", "1.31.1")
    problem = onnxruntime_install_problem([str(site)])
    assert "onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 are installed side by side" in problem
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'unidg[gpu]'" in problem
    assert "pip install 'unidg[cpu]'" in onnxruntime_install_problem([str(tmp_path / "empty")])
    monkeypatch.syspath_prepend(str(tmp_path / "gpu-beside"))
    _fake_distribution(tmp_path / "gpu-beside", "onnxruntime-gpu", "1.31.1")
    with pytest.raises(BackendUnavailable, match="onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1"):
        backend_class("onnxruntime")


def test_a_missing_onnxruntime_names_both_extras() -> None:
    from unidg.cli import missing_extra_message

    message = missing_extra_message(
        ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"), "generate"
    )
    assert "pip install 'unidg[cpu]'" in message and "pip install 'unidg[gpu]'" in message and "not both" in message
