"""``unidg eval run`` (registered by unidg.cli; heavy imports inside the handler)."""

from __future__ import annotations

import argparse
import json


def _run(args: argparse.Namespace) -> int:
    from unidg.train.evaluation.benchmark import run_benchmark
    from unidg.train.evaluation.config import load_eval_config

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output={json.dumps(args.output)}")
    config = load_eval_config(args.config, overrides)
    report = run_benchmark(config, progress=not args.quiet)
    print(f"report: {config.output}/report.md ({report['seconds']:.0f} s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from unidg.train.commands_train import eval_subparsers

    commands = eval_subparsers(subparsers)
    run = commands.add_parser(
        "run",
        help="run a benchmark config; writes report.md, report.json and plots (resumable)",
        description="Run the benchmark of --config (e.g. configs/eval-nano.toml). Trained detectors are cached by "
        "config hash under OUTPUT/cache: rerunning resumes.",
    )
    run.add_argument("--config", required=True, help="benchmark config (.toml or .json), e.g. configs/eval-nano.toml")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (TOML syntax), e.g. --set detectors.seg_epochs=4; repeatable",
    )
    run.add_argument("--output", help="report folder (overrides the config's 'output')")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.set_defaults(handler=_run)
