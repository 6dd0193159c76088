"""``unidg train base|sft|text|rft|reward-recog|cache|plan|merge|eval-nano|eq9`` and ``unidg eval reward-bench``
(registered by unidg.cli)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

from unidg.core.errors import OptionError, UniDGError
from unidg.runtime.cli_options import (
    add_command,
    add_config_options,
    add_data_option,
    add_json_option,
    add_out_option,
    add_overwrite_option,
    add_quiet_option,
    add_seed_option,
    add_weights_option,
    command_group,
    config_overrides,
    option_values,
    write_json_option,
)


def _add_config_arguments(parser: argparse.ArgumentParser, *, resumable: bool = True) -> None:
    add_config_options(
        parser,
        config="training config (.toml or .json), e.g. configs/nano-sft.toml",
        example="train.steps=20",
        out="run folder",
    )
    parser.add_argument(
        "--device",
        help="cpu, cuda (under torchrun: each process's cuda:LOCAL_RANK) or cuda:N (overrides train.device)",
    )
    if resumable:
        parser.add_argument(
            "--restart", action="store_true", help="ignore checkpoints in the run folder and start from step 0"
        )


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = config_overrides(args)
    if getattr(args, "device", None):
        overrides.append(f"train.device={json.dumps(args.device)}")
    return overrides


def _is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or a plain run): the one process that reports."""
    return int(os.environ.get("RANK", "0")) == 0


def _train_run(args: argparse.Namespace, load, train, done) -> int:
    """Load ``--config`` with the command line's overrides, train (resuming unless ``--restart``), and let rank 0
    print ``done(config, result)``: where the run wrote its output."""
    config = load(args.config, _overrides(args))
    result = train(config, resume=not args.restart)
    if _is_main_process():
        print(done(config, result))
    return 0


def _base(args: argparse.Namespace) -> int:
    # torch-heavy modules load when the command runs: `unidg --help` and the lean install stay light.
    from unidg.train.base import train_base
    from unidg.train.config import load_base_config

    return _train_run(args, load_base_config, train_base, lambda config, folder: f"base weights: {folder}")


def _lora_written(what: str, *, merge_hint: bool = False) -> Callable[[Any, Any], str]:
    """The ``done`` of a LoRA recipe: where ``what`` (the LoRA) and the run's log are; with ``merge_hint``, how to fold
    it into the merged SFT weights it was trained on."""

    def done(config, _) -> str:
        from unidg.train.lora import LORA_FILE

        written = f"{what}: {config.output}/{LORA_FILE} (log: {config.output}/log.jsonl)"
        if not merge_hint:
            return written
        merge = f"unidg train merge --base {config.base} --lora {config.output} --out OUT"
        return f"{written}; fold it into the SFT weights with `{merge}`"

    return done


def _sft(args: argparse.Namespace) -> int:
    from unidg.train.config import load_sft_config
    from unidg.train.sft import train_sft

    return _train_run(args, load_sft_config, train_sft, _lora_written("LoRA"))


def _text(args: argparse.Namespace) -> int:
    from unidg.train.text_sft import load_text_config, train_text

    return _train_run(args, load_text_config, train_text, _lora_written("LoRA (UniDG-Text)", merge_hint=True))


def _cache(args: argparse.Namespace) -> int:
    from unidg.train.config import load_sft_config
    from unidg.train.latent_cache import cache_for_config

    config = load_sft_config(args.config, _overrides(args))
    manifest = cache_for_config(config, progress=not args.quiet, verify=args.verify)
    size = sum(entry["bytes"] for entry in manifest["shards"].values())
    print(
        f"latent cache: {config.data.latent_cache} ({manifest['pairs']} pairs, {len(manifest['shards'])} shards, "
        f"{size / 1e9:.2f} GB)"
    )
    return 0


def _plan(args: argparse.Namespace) -> int:
    from unidg.train.config import load_sft_config
    from unidg.train.plan import format_plan, memory_plan, plan_json

    config = load_sft_config(args.config, _overrides(args))
    plan = memory_plan(config, args.gpus, args.preset)
    if args.json == "-":
        print(plan_json(plan))
        return 0
    print(format_plan(plan))
    write_json_option(args.json, plan_json(plan))
    return 0


def _eq9(args: argparse.Namespace) -> int:
    from unidg.train.eq9_region import measure

    print(json.dumps(measure(args.weights, args.data, args.count, args.seed, args.tau), indent=2))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from unidg.train.merge import merge_lora

    settings = {}
    for text in args.setting:
        key, _, value = text.partition("=")
        if not value:
            raise OptionError(f"--setting {text!r}: expected KEY=VALUE, e.g. --setting steps=28")
        settings[key] = json.loads(value) if value not in ("true", "false") else value == "true"
    report = merge_lora(args.base, args.lora, args.out, settings_overrides=settings, overwrite=args.overwrite)
    print(json.dumps(report, indent=2))
    return 0


def _eval_nano(args: argparse.Namespace) -> int:
    from unidg.train.eval_nano import evaluate_transfer

    report = evaluate_transfer(
        args.weights,
        args.data,
        **option_values(args, "count", "seed", "steps", "contact_sheet", "sheet_rows", "ceilings"),
        out_json=args.json,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=2))
    return 0


def _rft(args: argparse.Namespace) -> int:
    from unidg.train.rft import train_rft
    from unidg.train.rft_config import load_rft_config

    return _train_run(args, load_rft_config, train_rft, _lora_written("LoRA (EMA)", merge_hint=True))


def _reward_recog(args: argparse.Namespace) -> int:
    from unidg.train.reward_recog import RecogTrainConfig, train_reward_recog

    config = RecogTrainConfig(
        **option_values(args, "size", "epochs", "batch", "lr", "resnet_width", "unet_width", "seed")
    )
    config.validate()
    if args.limit < 0:
        raise UniDGError(f"--limit {args.limit} must be >= 0 (0: all quadruplets)")
    document = train_reward_recog(
        args.data, args.out, config, args.heldout, args.pretrained_classifier, args.limit, replace=args.overwrite
    )
    print(json.dumps({k: v for k, v in document.items() if k != "classes"}, indent=2))
    return 0


def _reward_bench(args: argparse.Namespace) -> int:
    from unidg.train.judge import JudgeError
    from unidg.train.reward_bench import run_reward_bench
    from unidg.train.rewards import RewardError

    try:
        report = run_reward_bench(args.reward, args.bench, args.json)
    except (RewardError, JudgeError) as error:
        raise UniDGError(str(error)) from error
    print(json.dumps(report, indent=2))
    return 0


def eval_subparsers(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The sub-commands of ``unidg eval`` (rewards here, downstream evaluation in unidg.train.evaluation)."""
    return command_group(subparsers, "eval", "evaluation: generated data, rewards")


def _bench_train(args: argparse.Namespace) -> int:
    from unidg.train.bench_train import bench_train

    return bench_train(args)


def _register_bench_train(subparsers: argparse._SubParsersAction) -> None:
    from unidg.runtime.commands import bench_subparsers

    parser = add_command(
        bench_subparsers(subparsers),
        _bench_train,
        "train",
        help="the SFT training step on a GPU: a full-width slice with the full recipe, and the nano step GPU vs CPU",
        description="Times one Diversity-SFT optimizer step of a full-width slice of the FLUX transformer (1 double + "
        "1 single block, width 3072) with configs/full-sft.toml's recipe (LoRA r=256, Prodigy, bf16, gradient "
        "checkpointing) at the tokens of a 768 x 1536 diptych, and the nano SFT step (configs/nano-sft.toml) on the "
        "GPU and the CPU. Random inputs; no weights or data are read. Writes bench_train.json and bench_train.md.",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, nano width, tiny size: check the harness")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before (allocator, autotuning)")
    add_out_option(parser, "folder for bench_train.json and bench_train.md", default="out/bench-train")
    parser.add_argument(
        "--configs",
        metavar="DIR",
        help="folder holding full-sft.toml and nano-sft.toml (default: the source checkout's configs/, else ./configs)",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_bench_train(subparsers)
    commands = command_group(
        subparsers, "train", "train: base model, Diversity-SFT LoRA, merge, nano evaluation", metavar="STAGE"
    )
    _register_stages(commands)
    _register_reward_recog(commands)
    _register_tools(commands)
    _register_evaluations(commands, subparsers)


def _register_stages(commands: argparse._SubParsersAction) -> None:
    """The training stages, each driven by a config: base, sft, text, rft."""
    stages = (
        (_base, "base", "train a base model from scratch: autoencoder, then diptych inpainter"),
        (_sft, "sft", "Diversity-SFT: LoRA on a base weights folder (flow matching + Eq. 9)"),
        (_text, "text", "UniDG-Text: instruction-editing LoRA on merged SFT weights (with and without a reference)"),
        (_rft, "rft", "Consistency-RFT: Flow-GRPO with a new LoRA on merged SFT weights, rewards from [reward]"),
    )
    for handler, name, help_line in stages:
        _add_config_arguments(add_command(commands, handler, name, help=help_line))


def _register_reward_recog(commands: argparse._SubParsersAction) -> None:
    recog = add_command(
        commands,
        _reward_recog,
        "reward-recog",
        help="Defect-Recog reward: ResNet-34 classifier + U-Net segmenter trained on a UDG folder",
    )
    add_data_option(recog, "UDG folder to train on")
    add_out_option(recog, "reward folder to write (recog.json + two safetensors)")
    recog.add_argument("--heldout", help="UDG folder to report category accuracy, AUROC-P, AP-P and PRO on")
    recog.add_argument("--size", type=int, default=64, help="input side of both networks")
    recog.add_argument("--epochs", type=int, default=5, help="epochs (paper: 5)")
    recog.add_argument("--batch", type=int, default=32, help="batch size (paper: 128)")
    recog.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    recog.add_argument("--resnet-width", type=int, default=64, help="ResNet-34 stem width (64: torchvision's)")
    recog.add_argument("--unet-width", type=int, default=16, help="U-Net base width")
    add_seed_option(recog, "seed of the weights and the data order")
    recog.add_argument("--limit", type=int, default=0, help="use the first N quadruplets (0: all)")
    recog.add_argument(
        "--pretrained-classifier", help="local torchvision resnet34 state dict (.safetensors) for the backbone"
    )
    add_overwrite_option(recog)


def _register_tools(commands: argparse._SubParsersAction) -> None:
    """What runs beside the stages: the latent cache, the memory plan, the Eq. 9 check, the LoRA merge."""
    cache = add_command(
        commands,
        _cache,
        "cache",
        help="precompute an SFT config's latents into the sharded cache of data.latent_cache (resumable)",
    )
    _add_config_arguments(cache, resumable=False)
    add_quiet_option(cache)
    cache.add_argument(
        "--verify", action="store_true", help="re-hash every finished shard (sha256) and rewrite the damaged ones"
    )

    plan = add_command(
        commands, _plan, "plan", help="parameter counts and per-GPU memory of an SFT config (meta device)"
    )
    _add_config_arguments(plan, resumable=False)
    plan.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs (processes)")
    plan.add_argument("--preset", default="full", choices=("full", "nano"), help="model shapes to plan for")
    add_json_option(plan, "write the plan as JSON to FILE ('-': standard output)", metavar="FILE")

    eq9 = add_command(
        commands,
        _eq9,
        "eq9",
        help="Eq. 9 hinge at the ground truth and at a copy of the normal image, per candidate region",
    )
    add_weights_option(eq9, "weights folder whose autoencoder encodes the pairs")
    add_data_option(eq9, "UDG folder")
    eq9.add_argument("--count", type=int, default=100, help="pairs, the three distributions mixed 1:1:1")
    add_seed_option(eq9, "seed of the pairs")
    eq9.add_argument("--tau", type=float, default=0.5, help="the margin of Eq. 9")

    merge = add_command(
        commands, _merge, "merge", help="fold a LoRA into its base -> merged weights folder (unidg.json)"
    )
    merge.add_argument("--base", required=True, help="base weights folder (unidg train base output: RUN/model)")
    merge.add_argument("--lora", required=True, help="SFT run folder holding lora.safetensors + lora.json")
    add_out_option(merge, "merged weights folder to write")
    merge.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="UniDG setting written to unidg.json (alpha, beta, threshold, resolution, text_tokens, steps, guidance)",
    )
    add_overwrite_option(merge)


def _register_evaluations(commands: argparse._SubParsersAction, subparsers: argparse._SubParsersAction) -> None:
    evaluate = add_command(
        commands,
        _eval_nano,
        "eval-nano",
        help="reference-colour transfer rate of a weights folder on held-out quadruplets",
    )
    add_weights_option(evaluate, "weights folder (e.g. runtime/assets/unidg-nano)")
    add_data_option(evaluate, "held-out UDG folder (a seed not used in training)")
    evaluate.add_argument("--count", type=int, default=60, help="evaluation pairs")
    add_seed_option(evaluate, "seed of the pairs and the sampling noise")
    evaluate.add_argument("--steps", type=int, default=None, help="sampling steps (default: unidg.json's)")
    evaluate.add_argument("--contact-sheet", help="write a PNG: reference | source + mask | output, one row a pair")
    evaluate.add_argument("--sheet-rows", type=int, default=8, help="rows of the contact sheet")
    add_json_option(evaluate, "write the full per-sample report here")
    evaluate.add_argument(
        "--ceilings",
        action="store_true",
        help="also score the ground-truth target and its autoencoder round trip by the same criterion",
    )

    bench = add_command(
        eval_subparsers(subparsers),
        _reward_bench,
        "reward-bench",
        help="agreement of a reward with human rubric scores (|delta| <= 0.3 counts, per dimension)",
        description="Scores every pair of a bench folder (BENCH/bench.jsonl; format in unidg.train.reward_bench) "
        "with the reward of --reward and prints the accuracy per rubric dimension.",
    )
    bench.add_argument("--reward", required=True, help="reward config (.toml with [judge] / [color] tables)")
    bench.add_argument("--bench", required=True, help="bench folder holding bench.jsonl and its images")
    add_json_option(bench, "also write the per-pair predictions here")
