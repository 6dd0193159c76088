"""``unidg export cache-graphs|cache-calibrate``: step caching for a bundle (docs/step-cache.md). Heavy imports live
in the handlers, so ``unidg --help`` works on the lean runtime install."""

from __future__ import annotations

import argparse
import json

from unidg.runtime.cli_options import (
    add_bundle_option,
    add_command,
    add_json_option,
    add_out_option,
    add_overwrite_option,
    add_weights_option,
    write_json_option,
)


def _thresholds(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--thresholds {text!r}: give comma-separated numbers, e.g. 0.04,0.08"
        ) from None


def register_cache_commands(export: argparse._SubParsersAction) -> None:
    graphs = add_command(
        export,
        run_cache_graphs,
        "cache-graphs",
        help="a copy of a bundle plus the step-cache graphs (head, tail, cached step); format_version 2",
        description="Export the step graph cut after its first block (step_head, step_tail, step_cached) from the "
        "bundle's weights and write the bundle again, atomically, with them; step.onnx is copied unchanged, so "
        "--cache off runs what it ran before. Caching stays off by default until cache-calibrate records a setting.",
    )
    add_bundle_option(graphs, help="bundle folder (unidg export onnx)")
    add_weights_option(graphs, "the merged weights folder the bundle was exported from")
    add_out_option(graphs, "bundle folder to write")
    add_overwrite_option(graphs)

    calibrate = add_command(
        export,
        run_cache_calibrate,
        "cache-calibrate",
        help="the step-cache accuracy gate: measure thresholds/schedules, record the fastest passing one",
        description="Run the held-out samples of a calibration set cached and uncached (onnxruntime, same noise); "
        "report PSNR of the generated square and inside the defect region, latent error and full evaluations per "
        "candidate; record the fastest candidate per mode whose worst defect-region PSNR reaches the bar in a new "
        "bundle folder. A --setting that fails is refused by name.",
    )
    add_bundle_option(calibrate, help="bundle with step-cache graphs (unidg export cache-graphs)")
    calibrate.add_argument("--calib", required=True, help="calibration set of the bundle's weights (unidg calib build)")
    add_out_option(calibrate, "bundle folder to write (never the input bundle)")
    calibrate.add_argument(
        "--thresholds",
        type=_thresholds,
        default=None,
        help="dynamic thresholds to try; each also derives a static schedule (default 0.04,0.08,0.12,0.16,0.24,0.32)",
    )
    calibrate.add_argument(
        "--setting",
        action="append",
        default=[],
        help="record this setting or fail: dynamic:0.08 or static:1101... (one 0/1 per step); repeatable",
    )
    calibrate.add_argument("--min-defect-psnr", type=float, default=None, help="the gate's bar in dB (default 35)")
    calibrate.add_argument("--samples", type=int, help="use at most this many held-out samples")
    calibrate.add_argument("--threads", type=int, help="onnxruntime intra-op threads")
    add_json_option(calibrate, "also write the table to this JSON file")
    add_overwrite_option(calibrate)


def run_cache_graphs(args: argparse.Namespace) -> int:
    # torch-heavy modules load when the command runs: `unidg --help` and the lean runtime install stay light
    from unidg.export.cache_graphs import add_cache_graphs

    add_cache_graphs(args.bundle, args.weights, args.out, overwrite=args.overwrite)
    return 0


def run_cache_calibrate(args: argparse.Namespace) -> int:
    from unidg.export.cache_calibrate import DEFAULT_MIN_DEFECT_PSNR, DEFAULT_THRESHOLDS, cache_calibrate
    from unidg.export.onnx_export import print_progress

    manifest, results = cache_calibrate(
        args.bundle,
        args.calib,
        args.out,
        thresholds=DEFAULT_THRESHOLDS if args.thresholds is None else args.thresholds,
        settings=args.setting,
        min_defect_psnr=DEFAULT_MIN_DEFECT_PSNR if args.min_defect_psnr is None else args.min_defect_psnr,
        samples=args.samples,
        threads=args.threads,
        overwrite=args.overwrite,
        progress=print_progress,
    )
    gate = manifest.metadata["step_cache"]["gate"]
    write_json_option(args.json, json.dumps(gate, indent=2), say=False)
    chosen = {mode: gate[mode]["name"] for mode in ("static", "dynamic") if mode in gate}
    print(f"default --cache {gate['default']}; recorded {chosen}; bundle written to {args.out}")
    return 0
