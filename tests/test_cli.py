"""The console command and the layering rule: the lean runtime never needs torch."""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

import pytest

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
    for command in (
        "data",
        "weights",
        "train",
        "generate",
        "batch",
        "demo",
        "bench",
        "serve",
        "capi",
        "export",
        "calib",
    ):
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
    """unidg.runtime imports nothing of train, export, calib or the console command anywhere (not even inside a
    function), and the heavy libraries only inside functions (the torch backend loads torch when it is used)."""
    never = ("unidg.train", "unidg.export", "unidg.calib", "unidg.cli")
    not_at_module_level = ("torch", "diffusers", "transformers")
    offenders = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for name, module_level in _imports(ast.parse(path.read_text())):
            banned = never + (not_at_module_level if module_level else ())
            if any(name == b or name.startswith(b + ".") for b in banned):
                offenders.append(f"{path.relative_to(ROOT)}: {name}{'' if module_level else ' (inside a function)'}")
    assert not offenders, offenders


def test_core_imports_no_other_stage_and_no_heavy_library() -> None:
    """unidg.core is the bottom layer: runtime, train, export and calib all import it, it imports none of them and no
    heavy library anywhere (not even inside a function)."""
    never = ("unidg.runtime", "unidg.train", "unidg.export", "unidg.calib", "unidg.cli") + HEAVY
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / "unidg" / "core").rglob("*.py"))
        for name, _ in _imports(ast.parse(path.read_text()))
        if any(name == b or name.startswith(b + ".") for b in never)
    ]
    assert not offenders, offenders


def test_layering_check_sees_imports_inside_functions() -> None:
    tree = ast.parse("import numpy\ndef f():\n    from unidg.train.model import UniDGModel\n    import torch\n")
    assert _imports(tree) == [("numpy", True), ("unidg.train.model", False), ("torch", False)]


def test_importing_runtime_modules_loads_no_torch() -> None:
    modules = sorted(
        "unidg.runtime." + p.relative_to(ROOT / "runtime").with_suffix("").as_posix().replace("/", ".")
        for p in (ROOT / "runtime").rglob("*.py")
        # triton_model.py runs inside Triton's Python backend, which provides its triton_python_backend_utils.
        if p.name not in ("__init__.py", "_embedding.py", "triton_model.py") and "capi" not in p.parts
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


def _parser_with(handler):
    parser = argparse.ArgumentParser(prog="unidg")
    parser.add_subparsers(dest="command").add_parser("probe").set_defaults(handler=handler)
    return parser


def test_only_user_errors_become_one_line(monkeypatch, capsys) -> None:
    from unidg import cli
    from unidg.core.errors import OptionError

    def refuse(args):
        raise OptionError("--probe 3: give a number below 2")

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(refuse))
    assert cli.main(["probe"]) == 2
    assert capsys.readouterr().err == "unidg probe: error: --probe 3: give a number below 2\n"

    def defect(args):
        raise ValueError("operands could not be broadcast together")  # a program defect, not the user's input

    monkeypatch.setattr(cli, "build_parser", lambda: _parser_with(defect))
    with pytest.raises(ValueError, match="broadcast"):
        cli.main(["probe"])


def test_help_shows_defaults_once() -> None:
    from unidg.cli import build_parser

    parser = build_parser()
    serve = parser.parse_known_args(["serve", "--bundle", "b"])[0]
    assert serve.workers == 1
    text = _subparser(parser, "serve").format_help()
    assert "(default: 8)" in " ".join(text.split())  # --max-queue, added by the formatter
    assert "default 8" not in text


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices[name]


@pytest.mark.parametrize(
    ("argv", "options"),
    [
        ([], {"providers": ["cpu"]}),
        (["--device", "cuda,cpu", "--threads", "2"], {"providers": ["cuda", "cpu"], "threads": 2}),
        (["--backend", "tensorrt", "--device", "cuda:1"], {"device": 1, "cuda_graph": False}),
        (["--backend", "torch"], {"device": "cpu", "cuda_graph": False, "compile": False, "fp8": False}),
    ],
)
def test_one_device_word_for_every_backend(argv: list[str], options: dict) -> None:
    from unidg.runtime.cli_options import ArgumentParser, add_backend_options, backend_options

    parser = ArgumentParser()
    add_backend_options(parser)
    got = backend_options(parser.parse_args(argv))
    assert {key: got[key] for key in options} == options


def test_serve_workers_share_the_cpu_cores() -> None:
    from unidg.core.errors import UniDGError
    from unidg.runtime.cli_options import ArgumentParser, add_backend_options, backend_options
    from unidg.runtime.cpu_cores import available_cores

    parser = ArgumentParser()
    add_backend_options(parser)
    assert backend_options(parser.parse_args([]), workers=2)["threads"] == max(1, available_cores() // 2)
    with pytest.raises(UniDGError, match="--device 'gpu0': the tensorrt backend takes a CUDA device index"):
        backend_options(parser.parse_args(["--backend", "tensorrt", "--device", "gpu0"]))


def test_command_groups_are_shared_in_any_registration_order() -> None:
    from unidg.runtime.cli_options import ArgumentParser, command_group

    parser = ArgumentParser(prog="unidg")
    subparsers = parser.add_subparsers(dest="command")
    command_group(subparsers, "bench", "benchmarks").add_parser("a").set_defaults(handler="a")
    command_group(subparsers, "bench", "benchmarks").add_parser("b").set_defaults(handler="b")
    assert parser.parse_args(["bench", "b"]).handler == "b"
    assert list(subparsers.choices) == ["bench"]
