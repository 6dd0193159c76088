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
    "unidg.train.commands_train",
    "unidg.train.evaluation.commands",
    "unidg.runtime.commands",
    "unidg.runtime.commands_surfaces",
    "unidg.export.commands_bench",
    "unidg.export.commands_triton",
    "unidg.export.commands",
    "unidg.calib.commands",
]


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
        print(
            f"unidg {args.command}: error: {error}. This command needs an optional extra; "
            "install it with e.g. `pip install 'unidg[train,export]'`.",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:
        # The reader went away (`unidg data validate DIR | head`): stop quietly, as other command-line tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
