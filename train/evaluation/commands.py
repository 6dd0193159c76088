"""``unidg eval run|transfer|diversity|instructions`` (registered by unidg.cli; heavy imports inside the handler)."""

from __future__ import annotations

import argparse
import json

from unidg.core.errors import UniDGError
from unidg.runtime.cli_options import (
    add_bundle_option,
    add_command,
    add_config_options,
    add_data_option,
    add_json_option,
    add_out_option,
    add_overwrite_option,
    add_quiet_option,
    add_seed_option,
    add_weights_option,
    config_overrides,
    write_json_option,
)


def _run(args: argparse.Namespace) -> int:
    # torch-heavy modules load when the command runs: `unidg --help` and the lean install stay light.
    from unidg.train.evaluation.benchmark import run_benchmark
    from unidg.train.evaluation.config import load_eval_config

    config = load_eval_config(args.config, config_overrides(args))
    report = run_benchmark(config, progress=not args.quiet)
    print(f"report: {config.output}/report.md ({report['seconds']:.0f} s)")
    return 0


def _transfer(args: argparse.Namespace) -> int:
    from unidg.runtime.step_cache import cache_setting
    from unidg.train.eval_nano import evaluate_transfer, evaluation_pairs
    from unidg.train.evaluation.generation_metrics import (
        defect_types_of,
        paired_transfer,
        reference_carries_colour,
        revised_transfer,
    )
    from unidg.train.loading import load_model

    if args.count < args.min_pairs:
        raise UniDGError(f"--count {args.count} is below --min-pairs {args.min_pairs}; raise --count")
    # Only pairs the figure keeps are generated: nothing is spent on shading-type references.
    pairs = evaluation_pairs(args.data, args.count, args.seed, keep=reference_carries_colour)
    if len(pairs) < args.min_pairs:
        raise UniDGError(
            f"--data {args.data} yields {len(pairs)} pairs with a colour-carrying reference, fewer than --min-pairs "
            f"{args.min_pairs}; synthesize a larger held-out set (`unidg data synth --count ...`)"
        )
    model = load_model(args.weights)
    steps = model.settings.steps
    caches = [cache_setting(args.cache, steps, "--cache")]
    if args.compare_cache:
        caches.append(cache_setting(args.compare_cache, steps, "--compare-cache"))
    defect_types = defect_types_of(args.data)
    figures, samples = [], []
    for cache in caches:  # the same pairs, noise and model for both settings
        report = evaluate_transfer(
            args.weights,
            args.data,
            count=len(pairs),
            seed=args.seed,
            ceilings=True,
            pairs=pairs,
            model=model,
            cache=cache,
        )
        figure = revised_transfer(report["samples"], defect_types, min_pairs=args.min_pairs)
        figure.update(cache=cache.describe(), count=report["count"], seconds=report["seconds"])
        figures.append(figure)
        samples.append(report["samples"])
    figure = {"weights": str(args.weights), "data": str(args.data), **figures[0]}
    if args.compare_cache:
        figure["compare"] = {**figures[1], "paired": paired_transfer(samples[0], samples[1], defect_types)}
    text = json.dumps(figure, indent=2)
    write_json_option(args.json, text, say=False)
    print(text)
    return 0


def _diversity(args: argparse.Namespace) -> int:
    from unidg.train.evaluation.generation_metrics import diversity

    report = diversity(args.bundle, args.data, args.inputs, args.samples, args.seed, args.steps, lpips=args.lpips)
    print(json.dumps(report, indent=2))
    return 0


def _instructions(args: argparse.Namespace) -> int:
    from unidg.train.evaluation.instruction_agreement import measure_instructions, parse_seeds

    report = measure_instructions(
        args.bundle,
        args.data,
        args.out,
        classifier=args.classifier,
        recog=args.recog,
        train_data=args.train_data,
        seeds=parse_seeds(args.seeds),
        limit=args.limit,
        threads=args.threads,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    pooled = report["pooled"]
    low, high = pooled["difference_ci95"]
    print(
        f"matched {100 * pooled['matched_rate']:.1f} ± {100 * pooled['matched_se']:.1f} %, crossed "
        f"{100 * pooled['crossed_rate']:.1f} ± {100 * pooled['crossed_se']:.1f} %, difference "
        f"{100 * pooled['difference']:.1f} ± {100 * pooled['difference_se']:.1f} points (95 % [{100 * low:.1f}, "
        f"{100 * high:.1f}]) over {pooled['quadruplets']} quadruplets x {len(report['seeds'])} seed(s); the "
        f"{report['classifier']} classifier names {100 * report['real_accuracy']:.1f} % of the real defects right "
        f"(chance {100 * report['chance']:.1f} %)"
    )
    print(f"report: {args.out}/report.md ({report['seconds']:.0f} s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from unidg.train.commands_train import eval_subparsers

    commands = eval_subparsers(subparsers)
    run = add_command(
        commands,
        _run,
        "run",
        help="run a benchmark config; writes report.md, report.json and plots (resumable)",
        description="Run the benchmark of --config (e.g. configs/eval-nano.toml). Trained detectors are cached by "
        "config hash under OUTPUT/cache: rerunning resumes.",
    )
    add_config_options(
        run,
        config="benchmark config (.toml or .json), e.g. configs/eval-nano.toml",
        example="detectors.seg_epochs=4",
        out="report folder",
    )
    add_quiet_option(run, help="no progress bars")

    transfer = add_command(
        commands,
        _transfer,
        "transfer",
        help="revised reference-colour transfer: colour-carrying defect types, relative to the round-trip ceiling",
    )
    add_weights_option(transfer, "merged weights folder, e.g. runtime/assets/unidg-nano")
    add_data_option(transfer, "held-out UDG folder (a synth seed never used in training)")
    transfer.add_argument(
        "--count",
        type=int,
        default=200,
        help="pairs to generate, all with a colour-carrying reference (shading-type references are not drawn)",
    )
    transfer.add_argument("--min-pairs", type=int, default=200, help="colour-carrying pairs required")
    add_seed_option(transfer, "seed of the pairs and the sampling noise")
    transfer.add_argument(
        "--cache",
        default="off",
        metavar="SETTING",
        help="step caching of the samples: off, static:SCHEDULE (one 0/1 per step, e.g. a bundle's gated schedule) "
        "or dynamic:THRESHOLD",
    )
    transfer.add_argument(
        "--compare-cache",
        metavar="SETTING",
        help="also generate the same pairs with the same noise under this setting; adds its figure and the paired "
        "difference of the transfer rates",
    )
    add_json_option(transfer, "also write the figure here")

    spread = add_command(
        commands,
        _diversity,
        "diversity",
        help="IL / IL-a: LPIPS from a local checkpoint, else the 1 - SSIM substitute (docs/eval.md)",
    )
    spread.add_argument("--bundle", default="runtime/assets/unidg-nano-bundle", help="UniDG bundle folder")
    add_data_option(spread, "held-out UDG folder")
    spread.add_argument("--inputs", type=int, default=32, help="inputs (pairs) to generate for")
    spread.add_argument("--samples", type=int, default=4, help="seeds per input")
    add_seed_option(spread, "seed of the held-out pairs and of the sampling noise")
    spread.add_argument("--steps", type=int, default=0, help="denoising steps (0: the bundle's)")
    spread.add_argument(
        "--lpips",
        help="local LPIPS AlexNet checkpoint (.safetensors, layout in docs/eval.md); without it: 1 - SSIM substitute",
    )

    agreement = add_command(
        commands,
        _instructions,
        "instructions",
        help="UniDG-Text without a reference: does the generated defect's category follow the instruction?",
        description="Generates every held-out quadruplet (its normal image and mask) under its own no-reference "
        "instruction and under the instruction of a quadruplet of another category, with the same seed, classifies "
        "both (by default from the pixels inside the target region, with a classifier trained on --train-data) and "
        "reports the matched and crossed rates with standard errors "
        "(docs/eval.md). Writes OUT/report.json and OUT/report.md.",
    )
    add_bundle_option(agreement, help="UniDG-Text bundle folder (`unidg export onnx` of a merged `unidg train text`)")
    add_data_option(agreement, "held-out UDG folder (index.jsonl with categories and captions)")
    agreement.add_argument(
        "--classifier",
        choices=["region", "recog"],
        default="region",
        help="region: a linear classifier of the pixel statistics inside the dilated target mask, trained on "
        "--train-data (default); recog: the Defect-Recog classifier of --recog on the whole image",
    )
    agreement.add_argument(
        "--train-data",
        metavar="DIR",
        help="training UDG folder the region classifier learns the categories from (e.g. out/nano/data/train)",
    )
    agreement.add_argument(
        "--recog",
        help="Defect-Recog folder (`unidg train reward-recog`) for --classifier recog",
    )
    add_out_option(agreement, "report folder (report.json, report.md)")
    add_overwrite_option(agreement)
    agreement.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds: each draws the pairing, the wording and the noise"
    )
    agreement.add_argument("--limit", type=int, default=0, help="the first N quadruplets only (0: all)")
    agreement.add_argument(
        "--threads", type=int, default=None, help="onnxruntime CPU threads (default: the cores this process may use)"
    )
    add_quiet_option(agreement)
