"""``unidg export trtexec``: the trtexec commands equivalent to ``unidg export engine`` for a bundle, and the
commands that profile the resulting plans (per-layer profile).

The commands come from the same build plan as the Python builder (``unidg.export.engine.plan_builds``): the same
optimization profiles (``--minShapes/--optShapes/--maxShapes``), the same precision mode and builder flags
(``TRTEXEC_BUILDER_FLAGS`` says which flags each trtexec option sets) and the same options.

Two trtexec dialects (``EngineRequest.trtexec_major``, default the newest): TensorRT 10 takes ``--stronglyTyped`` and
the precision flags ``--bf16``/``--fp16``, and profiles with ``--useCudaGraph --separateProfileRun
--noDataTransfers``; TensorRT 11 builds strongly typed only (the precision flags are removed, ``--stronglyTyped`` and
those profiling options are deprecated no-ops), so its commands omit them. ``--profilingVerbosity=detailed`` is a
build option (it decides what layer information the plan keeps), so it goes on the build command.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from unidg.export.engine import EngineError, EngineRequest, GraphBuild, plan_builds
from unidg.runtime.bundle import Bundle, load_bundle


def shape_arg(shapes: dict[str, tuple[int, ...]]) -> str:
    """trtexec's shape syntax: ``name:1x32x64,other:1x65``."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in shape)}" for name, shape in shapes.items())


# BuilderFlag members each trtexec build option sets (trtexec's sampleOptions/sampleEngines): --stripWeights is
# refit-identical unless --refit is also given.
TRTEXEC_BUILDER_FLAGS: dict[str, frozenset[str]] = {
    "--bf16": frozenset({"BF16"}),
    "--fp16": frozenset({"FP16"}),
    "--int8": frozenset({"INT8"}),
    "--fp8": frozenset({"FP8"}),
    "--refit": frozenset({"REFIT"}),
    "--versionCompatible": frozenset({"VERSION_COMPATIBLE"}),
}
PRECISION_BUILDER_FLAGS = ("BF16", "FP16", "INT8", "FP8")
# Profiling options that TensorRT 11's trtexec deprecates as no-ops.
TENSORRT10_PROFILE_OPTIONS = ("--useCudaGraph", "--separateProfileRun", "--noDataTransfers")


def builder_flags_of(command: list[str]) -> set[str]:
    """The BuilderFlag members a trtexec build command sets (for checking it against the Python builder)."""
    flags: set[str] = set()
    for arg in command:
        flags |= TRTEXEC_BUILDER_FLAGS.get(arg, frozenset())
    if "--stripWeights" in command:
        flags |= {"STRIP_PLAN"} if "--refit" in command else {"STRIP_PLAN", "REFIT_IDENTICAL"}
    return flags


def _corner(build: GraphBuild, index: int) -> dict[str, tuple[int, ...]]:
    return {name: corners[index] for name, corners in build.profile.shapes.items()}


def build_command(build: GraphBuild, bundle_dir: Path, trtexec: str = "trtexec") -> list[str]:
    """The trtexec build command of one plan (argument list)."""
    options = build.options
    args = [trtexec, f"--onnx={bundle_dir / build.onnx.name}", f"--saveEngine={bundle_dir / build.plan}"]
    precision = [flag for flag in build.builder_flags if flag in PRECISION_BUILDER_FLAGS]
    if options.trtexec_major >= 11:
        if precision:
            raise EngineError(
                f"--{precision[0].lower()}: TensorRT 11 builds strongly typed only and its trtexec has no precision "
                f"flags; export the bundle with --precision {precision[0].lower()}, or print TensorRT 10 commands "
                "with --tensorrt-major 10"
            )
    elif build.strongly_typed:
        args.append("--stronglyTyped")
    args += [f"--{flag.lower()}" for flag in precision]
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
    if "REFIT" in build.builder_flags:
        args.append("--refit")
    if options.version_compatible:
        args.append("--versionCompatible")
    if options.hardware_compatibility == "ampere_plus":
        args.append("--hardwareCompatibilityLevel=ampere+")
    elif options.hardware_compatibility == "same_compute_capability":
        args.append("--hardwareCompatibilityLevel=sameComputeCapability")
    if options.workspace_gb:
        args.append(f"--memPoolSize=workspace:{int(options.workspace_gb * 1024)}M")
    args += ["--profilingVerbosity=detailed", "--skipInference"]
    return args


def profile_command(build: GraphBuild, bundle_dir: Path, trtexec: str = "trtexec") -> list[str]:
    """The trtexec profiling command of one built plan at the profile's opt shapes (the bundle's own batch and S)."""
    args = [trtexec, f"--loadEngine={bundle_dir / build.plan}"]
    if not build.profile.static:
        args.append(f"--shapes={shape_arg(_corner(build, 1))}")
    if build.options.trtexec_major < 11:
        args += list(TENSORRT10_PROFILE_OPTIONS)
    args += ["--dumpProfile", f"--exportProfile={bundle_dir / build.plan}.profile.json"]
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
    """The shell script text printed by ``unidg export trtexec``; writes the TensorRT form of the step graph into
    the bundle (graph only) when the build needs one."""
    bundle = load_bundle(bundle_path, verify=False)
    lines = [f"# trtexec commands for {bundle.describe()} (TensorRT {request.trtexec_major} trtexec)"]
    builds = plan_builds(bundle, request)
    for build in builds:
        if build.derive is not None:
            build.prepare_graph()
            lines.append(
                f"# wrote {build.onnx.name}: the step graph with {build.attention} attention for TensorRT (graph only; "
                f"the weights stay where {build.derive[0].name} keeps them)"
            )
    if any(build.uses_plugin for build in builds):
        engine = f"unidg export engine --bundle {shlex.quote(str(bundle.path))} --graphs step"
        if request.plugin_large_shared_memory:
            engine += " --plugin-large-shared-memory"
        lines.append(
            "# The step graph uses the unidg::biased_attention plugin node: trtexec cannot register a Python-defined"
            f" plugin, so build the step plan with `{engine}`; the built plan embeds the AOT kernel and"
            " trtexec profiles it with no plugin library. Plugin tactics are limited to 48 KiB of shared memory"
            + (
                " (lifted: --plugin-large-shared-memory)."
                if request.plugin_large_shared_memory
                else " unless --plugin-large-shared-memory is given."
            )
        )
    lines.append(f"mkdir -p {shlex.quote(str(bundle.path / 'engines'))}")
    for build in builds:
        lines.append(f"# {build.graph}: build")
        command = shlex.join(build_command(build, bundle.path, trtexec))
        lines.append(f"# {command}" if build.uses_plugin else command)
    for build in builds:
        lines.append(f"# {build.graph}: profile (per-layer times)")
        lines.append(shlex.join(profile_command(build, bundle.path, trtexec)))
    return "\n".join(lines) + "\n"
