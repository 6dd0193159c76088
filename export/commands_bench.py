"""``unidg bench attention``, ``unidg bench runtime`` and ``unidg bench gpu`` (registered by unidg.cli).

``unidg bench`` is one parser shared by every benchmark: each module adds its subcommand to it through
``unidg.runtime.commands.bench_subparsers(subparsers)``, which returns the ``bench`` sub-command group (created on
first use), so registration order does not matter. Only argparse at import time.
"""

from __future__ import annotations

import argparse

from unidg.core.errors import OptionError
from unidg.export.bench_cli import command_line, use_triton_interpreter
from unidg.runtime.cli_options import (
    add_bundle_option,
    add_command,
    add_json_option,
    add_seed_option,
    write_json_option,
)
from unidg.runtime.commands import bench_subparsers


def _bench_attention(args: argparse.Namespace) -> int:
    device = args.device
    interpret = args.interpret or device == "cpu"
    shape = args.shape or ("tiny" if interpret else "real")
    if interpret:
        use_triton_interpreter()
    if args.repeats < 1:
        raise OptionError(f"--repeats must be >= 1, got {args.repeats}")

    # torch-heavy modules load when the command runs: `unidg --help` and the lean runtime install stay light
    from unidg.export.bench_attention import format_table, run_attention_bench, to_json

    result = run_attention_bench(
        device=device,
        shape=shape,
        repeats=args.repeats,
        dtype=args.dtype,
        interpret=interpret,
        tile_sweep=args.tile_sweep,
    )
    result.command = command_line("unidg bench attention")
    print(format_table(result))
    write_json_option(args.json, to_json(result))
    return 0


def _bench_runtime(args: argparse.Namespace) -> int:
    from unidg.export.bench_runtime import bench_runtime

    return bench_runtime(args)


def _register_bench_runtime(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        bench_subparsers(subparsers),
        _bench_runtime,
        "runtime",
        help="end-to-end time per sample: this runtime vs the torch reference sampler (CPU), or the torch backend "
        "at the full preset on a GPU (--gpu)",
    )
    parser.add_argument(
        "--bundle",
        action="append",
        default=None,
        help="bundle to time (default: the shipped UniDG-nano bundle); --vs-diffusers takes one per resolution",
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="weights folder the bundle was exported from, for the torch reference (default: the manifest's "
        "weights path next to the bundle)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per side (median reported; >= 5, --vs-diffusers >= 3)"
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the bundle's, 28)")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="CPU threads for every side (default: torch's; --vs-diffusers: 1 2, one table row each)",
    )
    parser.add_argument("--spin", action="store_true", help="onnxruntime's idle threads busy-wait (see unidg generate)")
    parser.add_argument(
        "--vs-diffusers",
        action="store_true",
        help="stock diffusers FluxFillPipeline with and without the key bias, the torch reference and this runtime, "
        "interleaved, per --bundle and --threads, with the load average (docs/performance.md)",
    )
    parser.add_argument("--gpu", action="store_true", help="torch backend, full preset, random weights, on CUDA")
    parser.add_argument("--resolution", type=int, default=768, help="--gpu: diptych half size S")
    add_json_option(parser, "also write the figures to this JSON file")


def _register_bench_cache(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        bench_subparsers(subparsers),
        _bench_cache,
        "cache",
        help="step caching side by side (CPU): evaluations and time per sample, PSNR vs uncached, off/static/dynamic",
    )
    add_bundle_option(parser, required=False, help="bundle with step-cache data (default: the shipped UniDG-nano)")
    parser.add_argument("--samples", default=None, help="sample cases folder (default: the shipped samples)")
    parser.add_argument("--requests", type=int, default=None, help="use the first N sample cases (default: all)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of every request per mode")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime CPU threads (default: all cores)")
    parser.add_argument("--cache-threshold", type=float, default=None, help="dynamic threshold (default: the gate's)")
    parser.add_argument(
        "--vs-diffusers",
        action="store_true",
        help="add the stock diffusers FluxFillPipeline (key bias, uncached) as a fourth column; needs the training "
        "extra and the bundle's weights folder",
    )
    parser.add_argument("--weights", help="with --vs-diffusers: the weights folder (default: the bundle's record)")
    add_json_option(parser, "also write the figures to this JSON file")


def _bench_cache(args: argparse.Namespace) -> int:
    from unidg.export.bench_cache import bench_cache

    return bench_cache(args)


def _bench_gpu(args: argparse.Namespace) -> int:
    if args.all:
        from unidg.export.bench_gpu_all import bench_gpu_all

        return bench_gpu_all(args)
    if args.cache_full_steps is not None or args.cache_manifest is not None or args.only is not None:
        raise OptionError("--only, --cache-full-steps and --cache-manifest belong to --all; add --all")
    from unidg.export.bench_gpu import bench_gpu

    return bench_gpu(args)


def _register_bench_gpu(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        bench_subparsers(subparsers),
        _bench_gpu,
        "gpu",
        help="the full-scale step on one CUDA GPU: eager -> compile -> fused biased attention -> FP8 -> CUDA graph, "
        "VAE, image encoder, end to end, attention alone, against the FLOP floor",
        description="Builds the full FLUX.1-Fill + Redux model with random weights on the GPU in bf16 and times it at "
        "S = 768 (5849 tokens, 5338 folded). Writes bench_gpu.json and bench_gpu.md into --out. --dry-run runs every "
        "path on the CPU at the nano preset's tiny size (FP8 emulated, the Triton kernel interpreted, no graph "
        "capture): a check of the harness, not figures. See docs/performance.md for carrying it to a bare GPU machine.",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, nano preset, tiny size: check every path")
    parser.add_argument(
        "--all",
        action="store_true",
        help="the one-call session: machine record, stock diffusers baseline, each option alone, the fastest "
        "combination end to end, attention tile sweep, bench train, onnxruntime CUDA EP; rows by value within "
        "--budget-s; writes bench_gpu_all.json and bench_gpu_all.md",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="--all: seconds for the whole run; rows that no longer fit are recorded as skipped (budget)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="--all: comma-separated words; only the rows whose names contain one run (the stock eager step always "
        "runs, as the reference of every ratio), e.g. 'tile sweep,bench train' for what a first run's budget skipped",
    )
    parser.add_argument(
        "--cache-full-steps",
        type=int,
        default=None,
        help="--all: steps run in full under a static step-caching schedule (the derived caching row)",
    )
    parser.add_argument(
        "--cache-manifest",
        default=None,
        help="--all: bundle folder or manifest.json whose step_cache.full_steps gives that schedule instead",
    )
    parser.add_argument("--resolution", type=int, default=None, help="diptych half size S (default 768; dry run 64)")
    parser.add_argument(
        "--steps", type=int, default=None, help="denoising steps of the captured loop (default 28; dry run 2)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per row; the median is reported")
    add_seed_option(parser, "seed of the random weights and inputs")
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compiled rows (default inductor; the CPU test uses eager to stay fast)",
    )
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile (a fallback where compilation fails or is slow)"
    )
    parser.add_argument(
        "--out",
        default="out/bench-gpu",
        help="folder for bench_gpu.json and bench_gpu.md (bench_gpu_all.* with --all), rewritten after every row",
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    _register_bench_runtime(subparsers)
    _register_bench_cache(subparsers)
    _register_bench_gpu(subparsers)
    parser = add_command(
        bench_subparsers(subparsers),
        _bench_attention,
        "attention",
        help="biased-attention kernel vs torch SDPA (no bias, float mask, head-dim fold) at the FLUX shapes",
        description="Times the Triton biased-attention kernel against torch SDPA without bias (best fused backend), "
        "with the key bias as a float mask, with the bias folded into an extra head dimension, and as unbiased "
        "attention over key groups merged by log-sum-exp, at B=1, H=24, "
        "D=128, N=5849 (unfolded) and 5338 (folded text tokens). On CPU it runs tiny shapes under Triton's "
        "interpreter to check the harness only.",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda", help="where to run")
    parser.add_argument("--interpret", action="store_true", help="run the kernel under Triton's interpreter")
    parser.add_argument(
        "--shape", choices=("real", "tiny"), default=None, help="real FLUX shapes (default on cuda) or tiny ones"
    )
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per variant; the median is reported")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="Q/K/V dtype")
    parser.add_argument(
        "--tile-sweep",
        action="store_true",
        help="also time the kernel pinned to each tile configuration (data for choosing the autotuned set)",
    )
    add_json_option(parser, "also write the results to this JSON file")
