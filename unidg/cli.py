"""The ``unidg`` console command.

Each subpackage contributes its subcommands through a module with a ``register(subparsers)`` function. Registration
uses argparse only; heavy imports (torch, onnx, ...) happen inside the handlers, so ``unidg --help`` works on the
lean runtime install.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from unidg import __version__
from unidg.core.errors import UniDGError
from unidg.runtime.cli_options import ArgumentParser

# Modules that add subcommands, in the order they appear in ``unidg --help``.
COMMAND_MODULES: list[str] = [
    "unidg.train.commands_data",
    "unidg.train.commands_weights",
    "unidg.train.commands_train",
    "unidg.train.evaluation.commands",
    "unidg.runtime.commands",
    "unidg.runtime.commands_surfaces",
    "unidg.export.commands_bench",
    "unidg.export.commands_triton",
    "unidg.export.commands",
    "unidg.calib.commands",
]


# The extra of pyproject.toml that installs each optional top-level module a command may need.
EXTRA_OF_MODULE: dict[str, str] = {
    **dict.fromkeys(
        ("torch", "diffusers", "transformers", "peft", "safetensors", "prodigyopt", "skimage", "scipy", "httpx"),
        "train",
    ),
    **dict.fromkeys(("pydantic", "matplotlib"), "train"),
    **dict.fromkeys(("onnx", "onnxscript", "polygraphy", "onnx_graphsurgeon", "modelopt", "triton"), "export"),
    **dict.fromkeys(("onnxconverter_common", "onnxslim", "lief", "cppimport"), "export"),
    **dict.fromkeys(("fastapi", "uvicorn", "multipart", "python_multipart"), "serve"),
    "cffi": "capi",
    "tokenizers": "text",
    **dict.fromkeys(("tensorrt", "cuda"), "tensorrt"),
    "tritonclient": "dev",
}


# Commands whose heavy work needs [export] (which includes [train]) rather than the module's own extra.
EXPORT_COMMANDS = ("export", "calib")


def missing_extra_message(error: ModuleNotFoundError, command: str | None = None) -> str:
    """A missing optional module, and the install line that brings it (the extra that makes ``command`` work)."""
    module = (error.name or "").split(".")[0]
    if module == "onnxruntime":  # one of two extras, never both (they install the same module)
        return (
            "this command needs onnxruntime; install it with `pip install 'unidg[cpu]'` (CPU station) or "
            "`pip install 'unidg[gpu]'` (CUDA station), not both"
        )
    extra = EXTRA_OF_MODULE.get(module)
    if extra is None:
        return f"{error}; it is not an optional dependency of unidg: reinstall unidg"
    if extra == "train" and command in EXPORT_COMMANDS:
        extra = "export"
    return f"this command needs the '{module}' package; install it with `pip install 'unidg[{extra}]'`"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="unidg", description="UniDG defect-image generation toolkit.")
    parser.add_argument("--version", action="version", version=f"unidg {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        result = handler(args)
    # Only errors a user can fix are one line; anything else is a defect of the program and keeps its traceback.
    except (UniDGError, FileNotFoundError) as error:
        print(f"unidg {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        print(f"unidg {args.command}: error: {missing_extra_message(error, args.command)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`unidg data validate DIR | head`): stop quietly, as other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
