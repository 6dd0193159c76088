"""One command-line vocabulary (docs/cli.md), checked on every parser of the ``unidg`` command."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator

import pytest

from unidg.cli import build_parser

# Spellings the vocabulary replaced, with the one to use.
RETIRED = {"--force": "--overwrite", "--output": "--out", "--outdir": "--out", "--output-dir": "--out"}


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("unidg",)) -> Iterator[tuple]:
    """(path, parser, help line) of every command and sub-command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name)
                yield from commands(sub, (*path, name))


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.option_strings and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield action


ALL = list(commands(build_parser()))


def every_option() -> Iterator[tuple[str, argparse.Action]]:
    """(command, option) of every option of every command, the command as typed ("unidg train sft")."""
    for path, parser, _ in ALL:
        for action in options(parser):
            yield " ".join(path), action


def test_every_command_has_a_help_line_and_a_description() -> None:
    missing = [" ".join(path) for path, parser, help_line in ALL if not help_line or not parser.description]
    assert not missing, f"commands without a help line or description: {missing}"


def test_every_option_says_what_it_does() -> None:
    missing = [
        f"{command} {action.option_strings[0]}" for command, action in every_option() if not (action.help or "").strip()
    ]
    assert not missing, f"options without help: {missing}"


def test_retired_spellings_are_gone() -> None:
    found = [
        f"{command} {flag} (use {RETIRED[flag]})"
        for command, action in every_option()
        for flag in action.option_strings
        if flag in RETIRED
    ]
    assert not found, found


def test_json_always_names_a_file_and_quiet_is_a_switch() -> None:
    wrong = []
    for command, action in every_option():
        if "--json" in action.option_strings and action.nargs == 0:
            wrong.append(f"{command} --json is a switch; it takes FILE")
        if "--quiet" in action.option_strings and action.nargs != 0:
            wrong.append(f"{command} --quiet takes a value")
    assert not wrong, wrong


def test_restart_only_where_a_run_resumes() -> None:
    with_restart = {command for command, action in every_option() if "--restart" in action.option_strings}
    assert with_restart == {"unidg train base", "unidg train sft", "unidg train text", "unidg train rft"}


@pytest.mark.parametrize("path", [("train", "merge"), ("generate",), ("export", "onnx")])
def test_help_shows_defaults(path: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*path, "--help"])
    text = capsys.readouterr().out
    assert re.search(r"\(default: [^)]+\)", text), text


def test_one_seed_default_on_every_surface() -> None:
    """CLI, HTTP, Triton and the C ABI start from the same seed when a request gives none."""
    from pathlib import Path

    from unidg.runtime import sampler

    generate = next(parser for path, parser, _ in ALL if path == ("unidg", "generate"))
    (seed,) = [a for a in options(generate) if "--seed" in a.option_strings]
    assert seed.default == sampler.DEFAULT_SEED == 0
    header = (Path(sampler.__file__).parent / "capi" / "unidg.h").read_text()
    assert re.search(r"int64_t seed;.*default 0\b", header)
