"""``unidg export trtexec``: the trtexec commands equivalent to ``unidg export engine`` for a bundle, and the
commands that profile the resulting plans (CUDA graph, separate profile run, per-layer profile).

The commands come from the same build plan as the Python builder (``unidg.export.engine.plan_builds``): the same
optimization profiles (``--minShapes/--optShapes/--maxShapes``), the same precision mode (``--stronglyTyped`` for
graphs that carry their precision, ``--bf16``/``--fp16`` for TensorRT-chosen precision) and the same options.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from unidg.export.engine import EngineRequest, GraphBuild, plan_builds
from unidg.runtime.bundle import Bundle, load_bundle


def shape_arg(shapes: dict[str, tuple[int, ...]]) -> str:
    """trtexec's shape syntax: ``name:1x32x64,other:1x65``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


def _corner(build: GraphBuild, index: int) -> dict[str, tuple[int, ...]]:
    return {name: corners[index] for name, corners in build.profile.shapes.items()}


def build_command(build: GraphBuild, bundle_dir: Path, trtexec: str = "trtexec") -> list[str]:
    """The trtexec build command of one plan (argument list)."""
    options = build.options
    args = [trtexec, f"--onnx={bundle_dir / build.onnx.name}", f"--saveEngine={bundle_dir / build.plan}"]
    if build.strongly_typed:
        args.append("--stronglyTyped")
    for flag in build.builder_flags:
        if flag in ("BF16", "FP16", "INT8", "FP8"):
            args.append(f"--{flag.lower()}")
    if not build.profile.static:
        args += [
            f"--minShapes={shape_arg(_corner(build, 0))}",
            f"--optShapes={shape_arg(_corner(build, 1))}",
            f"--maxShapes={shape_arg(_corner(build, 2))}",
        ]
    args.append(f"--builderOptimizationLevel={options.optimization_level}")
    if options.timing_cache is not None:
        args.append(f"--timingCacheFile={options.timing_cache}")
    if "STRIP_PLAN" in build.builder_flags:
        args.append("--stripWeights")
    elif "REFIT" in build.builder_flags:
        args.append("--refit")
    if options.version_compatible:
        args.append("--versionCompatible")
    if options.hardware_compatibility == "ampere_plus":
        args.append("--hardwareCompatibilityLevel=ampere+")
    elif options.hardware_compatibility == "same_compute_capability":
        args.append("--hardwareCompatibilityLevel=sameComputeCapability")
    if options.workspace_gb:
        args.append(f"--memPoolSize=workspace:{int(options.workspace_gb * 1024)}M")
    args.append("--skipInference")
    return args


def profile_command(build: GraphBuild, bundle_dir: Path, trtexec: str = "trtexec") -> list[str]:
    """The trtexec profiling command of one built plan at the profile's opt shapes (the bundle's own batch and S)."""
    args = [trtexec, f"--loadEngine={bundle_dir / build.plan}"]
    if not build.profile.static:
        args.append(f"--shapes={shape_arg(_corner(build, 1))}")
    args += [
        "--useCudaGraph",
        "--separateProfileRun",
        "--dumpProfile",
        "--profilingVerbosity=detailed",
        "--noDataTransfers",
        f"--exportProfile={bundle_dir / build.plan}.profile.json",
    ]
    if "STRIP_PLAN" in build.builder_flags:
        # A weight-stripped plan takes its weights from the graph at load time (trtexec refits only with --refit).
        args += ["--refit", f"--refitFromOnnx={bundle_dir / build.onnx.name}"]
    return args


Commands = list[tuple[str, list[str], list[str]]]


def commands_for(bundle: Bundle, request: EngineRequest, trtexec: str = "trtexec") -> Commands:
    """(graph, build command, profile command) for every requested graph."""
    return [
        (build.graph, build_command(build, bundle.path, trtexec), profile_command(build, bundle.path, trtexec))
        for build in plan_builds(bundle, request)
    ]


def render(bundle_path: str | Path, request: EngineRequest, trtexec: str = "trtexec") -> str:
    """The shell script text printed by ``unidg export trtexec``."""
    bundle = load_bundle(bundle_path, verify=False)
    lines = [f"# trtexec commands for {bundle.describe()}"]
    builds = plan_builds(bundle, request)
    if any(build.uses_plugin for build in builds):
        lines.append(
            "# The step graph uses the unidg::biased_attention plugin node: trtexec cannot register a Python-defined"
            " plugin, so build the step plan with `unidg export engine`; the built plan embeds the AOT kernel and"
            " trtexec profiles it with no plugin library."
        )
    lines.append(f"mkdir -p {shlex.quote(str(bundle.path / 'engines'))}")
    for build in builds:
        lines.append(f"# {build.graph}: build")
        command = shlex.join(build_command(build, bundle.path, trtexec))
        lines.append(f"# {command}" if build.uses_plugin else command)
    for build in builds:
        lines.append(f"# {build.graph}: profile (CUDA graph, separate profile run, per-layer times)")
        lines.append(shlex.join(profile_command(build, bundle.path, trtexec)))
    return "\n".join(lines) + "\n"
