"""The console command and the layering rule: the lean runtime never needs torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft", "onnxscript", "modelopt", "triton", "tensorrt")


def test_help_lists_every_command_without_heavy_imports() -> None:
    code = (
        "import sys\n"
        "from unidg.cli import build_parser\n"
        "text = build_parser().format_help()\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(repr(heavy)); print(text)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    heavy_line, help_text = out.split("\n", 1)
    assert heavy_line == "[]", f"building the CLI imported {heavy_line}"
    for command in ("data", "train", "generate", "batch", "demo", "bench", "serve", "capi", "export", "calib"):
        assert f"    {command}" in help_text


def _imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module, at module level) for every absolute import in ``tree``, those inside functions included."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top))
    return found


def test_runtime_imports_the_lean_runtime_only() -> None:
    """unidg.runtime imports nothing of train, export or calib anywhere (not even inside a function), and the heavy
    libraries only inside functions (the torch backend loads torch when it is used)."""
    never = ("unidg.train", "unidg.export", "unidg.calib")
    not_at_module_level = ("torch", "diffusers", "transformers")
    offenders = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for name, module_level in _imports(ast.parse(path.read_text())):
            banned = never + (not_at_module_level if module_level else ())
            if any(name == b or name.startswith(b + ".") for b in banned):
                offenders.append(f"{path.relative_to(ROOT)}: {name}{'' if module_level else ' (inside a function)'}")
    assert not offenders, offenders


def test_layering_check_sees_imports_inside_functions() -> None:
    tree = ast.parse("import numpy\ndef f():\n    from unidg.train.model import UniDGModel\n    import torch\n")
    assert _imports(tree) == [("numpy", True), ("unidg.train.model", False), ("torch", False)]


def test_importing_runtime_modules_loads_no_torch() -> None:
    modules = sorted(
        "unidg.runtime." + p.relative_to(ROOT / "runtime").with_suffix("").as_posix().replace("/", ".")
        for p in (ROOT / "runtime").rglob("*.py")
        if p.name != "__init__.py" and "capi" not in p.parts and p.name != "_embedding.py"
    )
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print([m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing the runtime loaded {out}"


def test_user_error_is_one_line_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "unidg.cli", "generate", "--bundle", str(tmp_path / "missing")]
        + ["--reference", "r.png", "--reference-mask", "rm.png", "--source", "s.png", "--mask", "m.png"]
        + ["--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "error" in result.stderr.lower()
    assert not (tmp_path / "out").exists()


FLOOD = """
import argparse, sys
from unidg import cli

def build():
    parser = argparse.ArgumentParser(prog="unidg")
    flood = parser.add_subparsers(dest="command").add_parser("flood")
    flood.set_defaults(handler=lambda args: [print("line", i) for i in range(200_000)] and 0)
    return parser

cli.build_parser = build
sys.exit(cli.main(["flood"]))
"""


def test_a_closed_pipe_ends_quietly() -> None:
    # `unidg data validate DIR | head`: the reader leaves early; no traceback, the usual SIGPIPE status.
    process = subprocess.Popen([sys.executable, "-c", FLOOD], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline() == b"line 0\n"
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 141
    assert b"Traceback" not in stderr and b"BrokenPipe" not in stderr
