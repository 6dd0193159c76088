"""On a lean install (`unidg[cpu]`: numpy, Pillow, tqdm, onnxruntime) every command that needs an extra says which
one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from unidg.cli import EXTRA_OF_MODULE

ROOT = Path(__file__).resolve().parents[1]
NANO_WEIGHTS = ROOT / "runtime" / "assets" / "unidg-nano"
NANO_BUNDLE = ROOT / "runtime" / "assets" / "unidg-nano-bundle"

# Runs the CLI with every optional module hidden, as if only the base requirements were installed.
LEAN = """
import importlib.abc, sys
OPTIONAL = {optional!r}
class HideOptional(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in OPTIONAL:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, HideOptional())
from unidg.cli import main
sys.exit(main({argv!r}))
"""


def run_lean(argv: list[str]) -> subprocess.CompletedProcess:
    code = LEAN.format(optional=sorted(EXTRA_OF_MODULE), argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        (["serve", "--bundle", str(NANO_BUNDLE)], "serve"),
        (["capi", "build", "--out", "{tmp}/capi"], "capi"),
        (["train", "sft", "--config", "configs/nano-sft.toml", "--out", "{tmp}/sft"], "train"),
        (["data", "synth", "--out", "{tmp}/udg", "--count", "1"], "train"),
        (["export", "onnx", "--weights", str(NANO_WEIGHTS), "--out", "{tmp}/bundle"], "export"),
        (["calib", "build", "--data", "{tmp}/udg", "--weights", str(NANO_WEIGHTS), "--out", "{tmp}/c"], "export"),
    ],
)
def test_a_missing_extra_is_named(argv: list[str], extra: str, tmp_path: Path) -> None:
    result = run_lean([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"pip install 'unidg[{extra}]'" in result.stderr, result.stderr


def test_the_runtime_runs_on_a_lean_install(tmp_path: Path) -> None:
    """The demo needs none of the extras."""
    result = run_lean(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--quiet"])
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "contact_sheet.png").is_file()
