"""``unidg export onnx|quantize|engine|trtexec|adopt|check|parity|slice`` (registered by unidg.cli). Heavy imports
live in the handlers, so ``unidg --help`` works on the lean runtime install."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from unidg.export.commands_cache import register_cache_commands
from unidg.export.commands_triton import export_subparsers
from unidg.runtime.cli_options import (
    add_bundle_option,
    add_command,
    add_json_option,
    add_out_option,
    add_overwrite_option,
    add_seed_option,
    add_weights_option,
    option_values,
    write_json_option,
)


def _batch(text: str) -> int | str:
    if text == "dynamic":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: give a positive integer or 'dynamic'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--batch {value}: must be >= 1")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    export = export_subparsers(subparsers)
    _register_onnx(export)
    _register_quantize(export)
    _register_engine(export)
    _register_trtexec(export)
    _register_adopt(export)
    _register_check(export)
    _register_parity(export)
    _register_slice(export)
    register_cache_commands(export)


def _register_onnx(export: argparse._SubParsersAction) -> None:
    onnx = add_command(
        export,
        run_onnx,
        "onnx",
        help="bundle of ONNX graphs (step, VAE encoder/decoder, image encoder) from a merged weights folder",
        description="Export the four graphs of Bundle format v1 with torch's dynamo exporter (opset 23) and write "
        "manifest.json; the folder appears atomically (docs/export.md).",
    )
    add_weights_option(onnx, "merged weights folder (unidg train merge)")
    add_out_option(onnx, "bundle folder to write")
    onnx.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32", help="precision of the graphs")
    onnx.add_argument("--resolution", type=int, help="diptych half size S (default: the weights' unidg.json)")
    onnx.add_argument("--batch", type=_batch, default=1, help="static batch size or 'dynamic'")
    onnx.add_argument("--max-batch", type=int, default=16, help="upper bound of a dynamic batch")
    onnx.add_argument(
        "--sequence",
        choices=("static", "dynamic"),
        default="static",
        help="dynamic: the image-token count (resolution) is a graph axis",
    )
    onnx.add_argument(
        "--attention",
        choices=("portable", "plugin"),
        default="portable",
        help="portable: opset-23 Attention (onnxruntime, TensorRT); plugin: the fused biased-attention node (TensorRT)",
    )
    onnx.add_argument(
        "--portable-mask",
        choices=("expand", "fold"),
        default=None,
        help="form of the key bias in portable attention (default expand; see docs/export.md)",
    )
    add_overwrite_option(onnx)
    onnx.add_argument("--no-verify", action="store_true", help="skip re-hashing the weight files")
    onnx.add_argument(
        "--torch-programs",
        action="store_true",
        help="also save each graph as a torch.export program (torch/<graph>.pt2) for --backend torch",
    )
    onnx.add_argument(
        "--rope",
        choices=("op", "elementwise"),
        default="op",
        help="RoPE in the step graphs: op = ONNX RotaryEmbedding (onnxruntime, default); elementwise = Mul/Add, for "
        "a runtime without RotaryEmbedding",
    )
    onnx.add_argument(
        "--text-encoders",
        metavar="FOLDER",
        help="UniDG-Text weights only: the CLIP/T5 folder it was trained with (default: the one its manifest names)",
    )
    onnx.add_argument(
        "--share-graphs",
        metavar="BUNDLE",
        help="take BUNDLE's VAE and image-encoder graphs byte for byte where they are the same computation (same "
        "weights and outputs), so fine-tunes of one base store them once",
    )


def _register_quantize(export: argparse._SubParsersAction) -> None:
    quantize = add_command(
        export,
        run_quantize,
        "quantize",
        help="FP8 / INT8 bundle with NVIDIA ModelOpt, gated by an accuracy report",
        description="Calibrate the transformer on a calibration set (unidg calib build) with ModelOpt, export the "
        "Q/DQ step graph, measure velocity cosine and final-image PSNR against the unquantized bundle on the held-out "
        "samples, and write the bundle only if the gate passes.",
    )
    add_weights_option(quantize, "merged weights folder")
    quantize.add_argument("--calib", required=True, help="calibration set of these weights (unidg calib build)")
    quantize.add_argument("--format", choices=("fp8", "int8"), required=True, help="quantized format of the Linears")
    add_out_option(quantize, "bundle folder to write")
    quantize.add_argument(
        "--high-precision",
        choices=("bf16", "fp32"),
        help="precision of everything the quantized Linears do not cover (norms, RoPE, attention, VAE). Default: "
        "bf16 for fp8 (TensorRT; onnxruntime's CPU provider cannot run it), fp32 for int8",
    )
    quantize.add_argument(
        "--reference",
        help="unquantized bundle of the same weights at the calibration resolution (default: exported on the fly)",
    )
    quantize.add_argument("--alpha", type=float, default=0.8, help="SmoothQuant migration strength (int8)")
    quantize.add_argument("--min-cosine", type=float, default=None, help="gate: mean velocity cosine (0.995)")
    quantize.add_argument("--min-psnr", type=float, default=None, help="gate: worst final-image PSNR in dB (30)")
    quantize.add_argument("--calib-limit", type=int, help="use at most this many calibration step inputs")
    quantize.add_argument("--report-samples", type=int, help="trajectories in the report (default: all held-out)")
    quantize.add_argument(
        "--amax-scale",
        type=float,
        default=1.0,
        help="multiply the calibrated ranges (diagnostics; 0 gives an all-zero calibration that the gate rejects)",
    )
    add_overwrite_option(quantize)


def _register_engine(export: argparse._SubParsersAction) -> None:
    engine = add_command(
        export,
        run_engine,
        "engine",
        help="TensorRT plans for a bundle (TensorRT Python API; needs tensorrt and a GPU)",
        description="Build one serialized plan per graph with optimization profiles from the manifest shapes and "
        "record them (TensorRT version, compute capability, sha256) in the bundle's manifest.",
    )
    _engine_arguments(engine)


def _register_trtexec(export: argparse._SubParsersAction) -> None:
    trtexec = add_command(
        export,
        run_trtexec,
        "trtexec",
        help="print the equivalent trtexec build and profiling commands for a bundle",
    )
    _engine_arguments(trtexec)
    trtexec.add_argument(
        "--out",
        required=True,
        help="folder for the TensorRT graphs, trtexec.sh, trtexec.json, the plans and their build logs (never the "
        "bundle, which is only read)",
    )
    trtexec.add_argument("--trtexec", default="trtexec", help="trtexec executable (default: trtexec on PATH)")
    trtexec.add_argument(
        "--tensorrt-major",
        type=int,
        choices=(10, 11),
        help="trtexec dialect of the commands (default: the installed TensorRT's major, else 10)",
    )


def _register_adopt(export: argparse._SubParsersAction) -> None:
    adopt = add_command(
        export,
        run_adopt,
        "adopt",
        help="a new bundle with the plans trtexec built from `unidg export trtexec --out DIR`",
        description="Check each plan's build log (trtexec passed; TensorRT version, GPU and input shapes as recorded "
        "in DIR/trtexec.json) and write a new bundle: the source bundle's files, the plans and the graphs they were "
        "parsed from, and a manifest whose engines table the TensorRT backend reads. Source and DIR are only read.",
    )
    add_bundle_option(adopt, help="the bundle the trtexec commands were written for")
    adopt.add_argument("--plans", required=True, help="the --out folder of `unidg export trtexec`, plans built")
    add_out_option(adopt, "the new bundle folder")
    add_overwrite_option(adopt)


def _register_check(export: argparse._SubParsersAction) -> None:
    check = add_command(
        export,
        run_check,
        "check",
        help="polygraphy comparison of each graph on onnxruntime vs TensorRT, with the accuracy gate's thresholds",
        description="Write the graphs both sides run into --out and print two `polygraphy run` commands per graph: "
        "onnxruntime saves inputs and outputs, TensorRT compares with them (cosine >= 0.995; VAE decoder PSNR >= 30 "
        "dB). --run executes them (the TensorRT half only where tensorrt is installed).",
    )
    add_bundle_option(check, help="bundle folder whose graphs are compared")
    add_out_option(check, "folder for the graphs, inputs and outputs (not the bundle)")
    check.add_argument(
        "--attention-mask",
        choices=("key", "full"),
        default="key",
        help="mask form of the TensorRT step graph (as for `unidg export trtexec`)",
    )
    check.add_argument(
        "--decomposable", action="store_true", help="TRT_decomposable=1 on the Attention nodes TensorRT parses"
    )
    check.add_argument("--graphs", help="comma-separated subset of step,vae_encoder,vae_decoder,image_encoder")
    check.add_argument("--run", action="store_true", help="run the commands; exit 1 if a comparison fails")


def _register_parity(export: argparse._SubParsersAction) -> None:
    parity = add_command(
        export,
        run_parity,
        "parity",
        help="per-graph and 28-step trajectory parity of a bundle with the torch model (onnxruntime, polygraphy)",
    )
    add_bundle_option(parity, help="bundle folder to check")
    add_weights_option(parity, "the weights folder the bundle was exported from")
    parity.add_argument("--no-trajectory", action="store_true", help="per-graph figures only")
    parity.add_argument("--save", help="folder for polygraphy inputs/outputs JSON (re-run with `polygraphy run`)")
    add_json_option(parity, "write the figures to this JSON file")
    add_seed_option(parity, "seed of the probe inputs and the trajectory noise")


def _register_slice(export: argparse._SubParsersAction) -> None:
    slice_parser = add_command(
        export,
        run_slice,
        "slice",
        help="export the step graph of a preset with only a few blocks, random weights (size/time/memory checks)",
    )
    add_out_option(slice_parser, "folder for step.onnx (+ step.onnx.data)")
    slice_parser.add_argument("--preset", default="full", help="model shapes (full: FLUX.1-Fill; nano)")
    slice_parser.add_argument("--double-blocks", type=int, default=1, help="double-stream blocks kept")
    slice_parser.add_argument("--single-blocks", type=int, default=1, help="single-stream blocks kept")
    slice_parser.add_argument("--resolution", type=int, default=768, help="diptych half size S")
    slice_parser.add_argument("--heads", type=int, help="narrow the transformer to this many heads")


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    add_bundle_option(parser, help="bundle folder")
    precision = parser.add_mutually_exclusive_group()
    for flag in ("fp8", "int8", "bf16", "fp16"):
        precision.add_argument(
            f"--{flag}",
            dest="precision",
            action="store_const",
            const=flag,
            help=f"build for {flag} (default: the bundle's)",
        )
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--static", dest="dynamic", action="store_const", const=False, help="one fixed shape")
    shapes.add_argument("--dynamic", dest="dynamic", action="store_const", const=True, help="shape ranges")
    parser.add_argument("--min-batch", type=int, default=1, help="smallest batch of the optimization profile")
    parser.add_argument("--opt-batch", type=int, help="batch the profile is tuned for (default: --min-batch)")
    parser.add_argument("--max-batch", type=int, help="largest batch of the profile (default: the bundle's)")
    parser.add_argument("--min-resolution", type=int, help="smallest S of a dynamic-sequence bundle's profile")
    parser.add_argument("--max-resolution", type=int, help="largest S of a dynamic-sequence bundle's profile")
    parser.add_argument("--timing-cache", type=Path, help="timing cache file (read if present, then updated)")
    parser.add_argument("--optimization-level", type=int, default=3, help="builder optimization level 0..5")
    parser.add_argument("--refit", action="store_true", help="refittable plans")
    parser.add_argument("--strip-weights", action="store_true", help="weight-stripped plans (refit from the ONNX)")
    parser.add_argument(
        "--version-compatible", action="store_true", help="plans that later TensorRT versions can run (lean runtime)"
    )
    parser.add_argument(
        "--hardware-compatibility",
        choices=("none", "same_compute_capability", "ampere_plus"),
        default="none",
        help="GPUs other than the building one that may run the plans",
    )
    parser.add_argument("--workspace-gb", type=float, help="builder workspace limit in GiB (default: TensorRT's)")
    parser.add_argument(
        "--graphs",
        help="comma-separated subset of step,vae_encoder,vae_decoder,image_encoder (and step_head,step_tail,"
        "step_cached of a bundle with step-cache graphs); default: all of the bundle's",
    )
    parser.add_argument(
        "--attention",
        choices=("native", "plugin"),
        help="step attention for TensorRT: native Attention with a key-only mask (default) or the biased-attention "
        "plugin (default for bundles exported with --attention plugin)",
    )
    parser.add_argument(
        "--attention-mask",
        choices=("key", "full"),
        default="key",
        help="mask of native step attention: key-only [B,1,1,S] (default) or full [B,1,S,S] (the shape NVIDIA "
        "documents for IAttention); docs/export.md says how to see which gets a fused kernel",
    )
    parser.add_argument(
        "--decomposable",
        action="store_true",
        help="TRT_decomposable=1 on every Attention node TensorRT parses: without a matching fused kernel TensorRT "
        "falls back to MatMul/Softmax/MatMul instead of failing the build",
    )
    parser.add_argument(
        "--plugin-large-shared-memory",
        action="store_true",
        help="also offer attention-plugin tactics above 48 KiB of shared memory (default: only those within it)",
    )


# The options of _engine_arguments that EngineRequest takes as they are, by the same name.
ENGINE_OPTIONS = (
    "precision",
    "dynamic",
    "min_batch",
    "opt_batch",
    "max_batch",
    "min_resolution",
    "max_resolution",
    "optimization_level",
    "timing_cache",
    "refit",
    "strip_weights",
    "version_compatible",
    "hardware_compatibility",
    "workspace_gb",
    "plugin_large_shared_memory",
    "attention",
    "attention_mask",
    "decomposable",
)


def _engine_request(args: argparse.Namespace):
    # the export modules (torch, onnx, TensorRT) load when the command runs: `unidg --help` stays light
    from unidg.export.engine import EngineRequest

    # no --graphs: every graph of the bundle, its step-cache graphs included
    graphs = tuple(g.strip() for g in args.graphs.split(",")) if args.graphs else None
    return EngineRequest(
        **option_values(args, *ENGINE_OPTIONS),
        graphs=graphs,
        trtexec_major=getattr(args, "tensorrt_major", None),
    )


def run_onnx(args: argparse.Namespace) -> int:
    from unidg.export.bundle import export_bundle

    manifest = export_bundle(
        args.weights,
        args.out,
        precision=args.precision,
        resolution=args.resolution,
        batch=args.batch,
        max_batch=args.max_batch,
        dynamic_sequence=args.sequence == "dynamic",
        attention=args.attention,
        portable_mask=args.portable_mask,
        overwrite=args.overwrite,
        verify_weights=not args.no_verify,
        torch_programs=args.torch_programs,
        rope=args.rope,
        text_encoders=args.text_encoders,
        share_graphs_with=args.share_graphs,
    )
    meta = manifest.metadata
    print(
        f"wrote {args.out}: S={meta['resolution']} {meta['precision']} attention {meta['attention']} "
        f"({meta['attention_form']}), batch {meta['batch']}, {len(manifest.files)} files"
        + (", UniDG-Text (instructions)" if "text" in meta else "")
    )
    return 0


def run_quantize(args: argparse.Namespace) -> int:
    from unidg.export.quantize import DEFAULT_MIN_COSINE, DEFAULT_MIN_PSNR, quantize_bundle

    report = quantize_bundle(
        args.weights,
        args.calib,
        args.format,
        args.out,
        reference=args.reference,
        alpha=args.alpha,
        min_cosine=DEFAULT_MIN_COSINE if args.min_cosine is None else args.min_cosine,
        min_psnr=DEFAULT_MIN_PSNR if args.min_psnr is None else args.min_psnr,
        calib_limit=args.calib_limit,
        report_samples=args.report_samples,
        amax_scale=args.amax_scale,
        high_precision=args.high_precision,
        overwrite=args.overwrite,
    )
    print(json.dumps(report, indent=2))
    return 0


def run_engine(args: argparse.Namespace) -> int:
    from unidg.export.engine import build_engines

    table = build_engines(args.bundle, _engine_request(args))
    for graph, entry in table["plans"].items():
        print(f"{graph}: {entry['file']} sha256 {entry['sha256'][:16]}… batch {entry['batch']}")
    return 0


def run_trtexec(args: argparse.Namespace) -> int:
    from unidg.export.trtexec import render

    sys.stdout.write(render(args.bundle, _engine_request(args), Path(args.out), args.trtexec))
    return 0


def run_adopt(args: argparse.Namespace) -> int:
    from unidg.export.adopt import adopt_plans

    table = adopt_plans(args.bundle, args.plans, args.out, replace=args.overwrite)
    capability = ".".join(str(part) for part in table["compute_capability"])
    print(
        f"wrote {args.out}: {len(table['plans'])} plans of TensorRT {table['tensorrt_version']} for "
        f"{table['device_name']} (compute capability {capability})"
    )
    return 0


def run_check(args: argparse.Namespace) -> int:
    from unidg.export.check import check_commands, render, run_checks
    from unidg.export.engine import EngineRequest
    from unidg.runtime.bundle import GRAPH_NAMES

    graphs = tuple(g.strip() for g in args.graphs.split(",")) if args.graphs else GRAPH_NAMES
    request = EngineRequest(attention_mask=args.attention_mask, decomposable=args.decomposable, graphs=graphs)
    checks = check_commands(args.bundle, args.out, request)
    sys.stdout.write(render(checks))
    if not args.run:
        return 0
    results = run_checks(checks)
    for graph, verdict in results.items():
        print(f"{graph}: {verdict}")
    return 1 if any(verdict.startswith("FAIL") for verdict in results.values()) else 0


def run_parity(args: argparse.Namespace) -> int:
    from unidg.core.weights_folder import read_weights
    from unidg.export.parity import format_report, graph_parity, report, trajectory_parity
    from unidg.runtime.bundle import load_bundle
    from unidg.train.loading import load_weights_model

    model = load_weights_model(read_weights(args.weights))
    graphs = graph_parity(args.bundle, model, seed=args.seed, save_dir=args.save)
    skip_trajectory = args.no_trajectory
    if load_bundle(args.bundle).precision == "bf16" and not skip_trajectory:
        print(
            "bf16 bundle: graphs compared as their float32 emulation; no trajectory (needs TensorRT)", file=sys.stderr
        )
        skip_trajectory = True
    trajectory = None if skip_trajectory else trajectory_parity(args.bundle, model, seed=args.seed)
    data = report(graphs, trajectory)
    print(format_report(data))
    write_json_option(args.json, json.dumps(data, indent=2), say=False)
    failed = [name for name, parity in graphs.items() if parity.polygraphy_passed is False]
    if failed:
        print(
            f"error: parity FAILED for {failed}: bundle {args.bundle} does not compute what --weights {args.weights} "
            "computes; check that it was exported from these weights, or re-export it",
            file=sys.stderr,
        )
        return 1
    return 0


def run_slice(args: argparse.Namespace) -> int:
    from unidg.export.preset_slice import export_slice

    record = export_slice(
        args.out,
        preset=args.preset,
        double_blocks=args.double_blocks,
        single_blocks=args.single_blocks,
        heads=args.heads,
        resolution=args.resolution,
    )
    print(f"wrote {Path(args.out) / record.file} (+ {list(record.data_files)}) in {record.seconds:.1f} s")
    return 0
