"""``unidg data ...`` subcommands (registered by unidg.cli)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="UDG datasets: procedural quadruplets, validation")
    parser.set_defaults(handler=lambda args: parser.print_help() or 2)
