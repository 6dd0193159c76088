"""``unidg calib build`` (registered by unidg.cli): calibration sets for ``unidg export quantize``."""

from __future__ import annotations

import argparse
import sys

from unidg.runtime.cli_options import (
    add_command,
    add_data_option,
    add_out_option,
    add_overwrite_option,
    add_seed_option,
    add_weights_option,
    command_group,
    option_values,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    commands = command_group(subparsers, "calib", "calibration sets (step inputs along real trajectories)")
    build = add_command(
        commands,
        run_build,
        "build",
        help="capture step-graph inputs of N requests along their 28-step trajectories",
        description="Make N synthesis requests from a UDG folder (runtime geometry), run them with the torch "
        "reference sampler of the weights, and store the step inputs at the chosen steps as safetensors shards with "
        "a manifest tied to the weights fingerprint. Deterministic for a seed.",
    )
    add_data_option(build, "UDG folder (index.jsonl + images), e.g. from `unidg data synth`")
    add_weights_option(build, "merged weights folder (unidg train merge)")
    add_out_option(build, "calibration folder to write")
    build.add_argument("--samples", type=int, default=32, help="requests")
    build.add_argument("--steps", type=int, default=28, help="denoising steps per request")
    build.add_argument(
        "--step-subset",
        help="steps to capture: '0,7,14,21,27', ranges '0-3', 'every:4' (default: all)",
    )
    add_seed_option(build, "seed of the sample choice and the sampling noise")
    build.add_argument("--held-out", type=int, help="samples kept for the accuracy report (default samples/4)")
    build.add_argument("--resolution", type=int, help="diptych half size S (default: the weights' unidg.json)")
    build.add_argument("--samples-per-shard", type=int, default=8, help="calibration samples per safetensors shard")
    add_overwrite_option(build)


# The options of `unidg calib build` that build_calib takes as they are, by the same name.
BUILD_OPTIONS = ("samples", "steps", "step_subset", "seed", "held_out", "resolution", "samples_per_shard", "overwrite")


def run_build(args: argparse.Namespace) -> int:
    # torch-heavy modules load when the command runs: `unidg --help` and the lean runtime install stay light
    from unidg.calib.build import build_calib

    def progress(message: str) -> None:
        print(f"[unidg calib] {message}", file=sys.stderr, flush=True)

    manifest = build_calib(
        args.data,
        args.weights,
        args.out,
        **option_values(args, *BUILD_OPTIONS),
        progress=progress,
    )
    meta = manifest.metadata
    print(
        f"wrote {args.out}: {meta['samples']} samples x {len(meta['captured_steps'])} steps at S={meta['resolution']}"
        f", held out {meta['held_out']}, weights {meta['weights']['fingerprint'][:12]}…"
    )
    return 0
