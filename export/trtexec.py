"""``unidg export trtexec``: the trtexec commands equivalent to ``unidg export engine`` for a bundle, and the
commands that profile the resulting plans (per-layer profile).

The commands come from the same build plan as the Python builder (``unidg.export.engine.plan_builds``): the same
optimization profiles (``--minShapes/--optShapes/--maxShapes``), the same precision mode and builder flags
(``TRTEXEC_BUILDER_FLAGS`` says which flags each trtexec option sets) and the same options.

Every file the commands need or make goes to ``--out``, never into the bundle: the graphs TensorRT parses where they
differ from the bundle's (``unidg.export.tensorrt_graphs``), the plans, each build's log and layer information, the
script itself and ``trtexec.json`` (what each plan is asked to be: graph, profile, flags, the bundle's fingerprint),
which ``unidg export adopt`` reads to put the built plans into a new bundle.

Two trtexec dialects (``EngineRequest.trtexec_major``, default the installed TensorRT's, else 10): TensorRT 10
takes ``--stronglyTyped`` and
the precision flags ``--bf16``/``--fp16``, and profiles with ``--useCudaGraph --separateProfileRun
--noDataTransfers``; TensorRT 11 builds strongly typed only (the precision flags are removed, ``--stronglyTyped`` and
those profiling options are deprecated no-ops), so its commands omit them. ``--profilingVerbosity=detailed`` is a
build option (it decides what layer information the plan keeps), so it goes on the build command.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import onnx

from unidg.core.manifest import atomic_write_text
from unidg.export.engine import EngineError, EngineRequest, GraphBuild, engine_entry, plan_builds
from unidg.export.tensorrt_graphs import low_precision_resizes, tensorrt_graph_census
from unidg.runtime.bundle import Bundle, load_bundle

TRTEXEC_DESCRIPTION = "trtexec.json"
TRTEXEC_FORMAT = "unidg-trtexec-builds"
TRTEXEC_SCRIPT = "trtexec.sh"


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


def build_log(build: GraphBuild) -> str:
    """The build log of one plan, relative to the plan folder (trtexec's output, read by ``unidg export adopt``)."""
    return f"{build.plan}.build.log"


def build_command(build: GraphBuild, plan_dir: Path, trtexec: str = "trtexec") -> list[str]:
    """The trtexec build command of one plan (argument list); the plan goes to ``plan_dir``."""
    options = build.options
    args = [trtexec, f"--onnx={build.onnx}", f"--saveEngine={plan_dir / build.plan}"]
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
    # Layer information (which kernel each layer got) in the build log and beside the plan: how a first build shows
    # whether attention became one fused kernel.
    args += [
        "--profilingVerbosity=detailed",
        "--dumpLayerInfo",
        f"--exportLayerInfo={plan_dir / build.plan}.layers.json",
    ]
    args.append("--skipInference")
    return args


def profile_command(build: GraphBuild, plan_dir: Path, trtexec: str = "trtexec") -> list[str]:
    """The trtexec profiling command of one built plan at the profile's opt shapes (the bundle's own batch and S)."""
    args = [trtexec, f"--loadEngine={plan_dir / build.plan}"]
    if not build.profile.static:
        args.append(f"--shapes={shape_arg(_corner(build, 1))}")
    if build.options.trtexec_major < 11:
        args += list(TENSORRT10_PROFILE_OPTIONS)
    args += ["--dumpProfile", f"--exportProfile={plan_dir / build.plan}.profile.json"]
    if "STRIP_PLAN" in build.builder_flags:
        # A weight-stripped plan takes its weights from the graph at load time (trtexec refits only with --refit).
        args += ["--refit", f"--refitFromOnnx={build.onnx}"]
    return args


Commands = list[tuple[str, list[str], list[str]]]


def commands_for(bundle: Bundle, request: EngineRequest, out: Path, trtexec: str = "trtexec") -> Commands:
    """(graph, build command, profile command) for every requested graph, graphs and plans in ``out``."""
    return [
        (build.graph, build_command(build, out, trtexec), profile_command(build, out, trtexec))
        for build in plan_builds(bundle, request, graph_dir=out)
    ]


def check_out_folder(bundle: Bundle, out: Path) -> Path:
    """``out`` resolved; refused when it is the bundle or inside it (the bundle is only read)."""
    resolved, source = out.resolve(), bundle.path.resolve()
    if resolved == source or source in resolved.parents:
        raise EngineError(
            f"--out {out} is inside the bundle {bundle.path}: the bundle stays as exported (its manifest lists every "
            "file); choose a folder outside it"
        )
    return resolved


def description(bundle: Bundle, request: EngineRequest, builds: list[GraphBuild], out: Path, census: dict) -> dict:
    """``trtexec.json``: what each plan is asked to be, for ``unidg export adopt``."""
    plans = {}
    for build in builds:
        entry = engine_entry(build, "", 0.0)
        for key in ("sha256", "build_seconds"):
            entry.pop(key)
        entry["onnx"] = str(build.onnx.relative_to(out)) if build.derivation else build.onnx.name
        entry["derived"] = build.derivation is not None
        entry["log"] = build_log(build)
        entry["profile"] = {
            name: [list(corner) for corner in corners] for name, corners in build.profile.shapes.items()
        }
        plans[build.graph] = entry
    return {
        "format": TRTEXEC_FORMAT,
        "bundle": {"path": str(bundle.path.resolve()), "fingerprint": bundle.fingerprint},
        "tensorrt_major": request.trtexec_major,
        "version_compatible": request.version_compatible,
        "hardware_compatibility": request.hardware_compatibility,
        "plans": plans,
        "census": census,
    }


def render(bundle_path: str | Path, request: EngineRequest, out: str | Path, trtexec: str = "trtexec") -> str:
    """``unidg export trtexec``: write the TensorRT graphs, ``trtexec.json`` and ``trtexec.sh`` into ``out`` and
    return the script text (also printed). The bundle is only read."""
    bundle = load_bundle(bundle_path, verify=True)  # the engines are built from these files: they must be the export's
    out = check_out_folder(bundle, Path(out))
    builds = plan_builds(bundle, request, graph_dir=out)
    lines = [
        "#!/usr/bin/env bash",
        "set -euo pipefail",
        f"# trtexec commands for {bundle.describe()} (TensorRT {request.trtexec_major} trtexec)",
    ]
    census = {}
    for build in builds:
        derived = build.prepare_graph()
        census[build.graph] = derived or tensorrt_graph_census(_graph_only(build.onnx))
        if derived is not None:
            lines.append(
                f"# wrote {build.onnx.name}: {build.graph} for TensorRT ({_changes(build)}; external-data weights "
                f"of {build.source.name} are linked, not rewritten)"
            )
    for graph, figures in census.items():
        lines.append(
            f"# census {graph}: Resize {figures['resize'] or 'none'}, Attention masks {figures['attention_masks']}, "
            f"TRT_decomposable {figures['decomposable']}, plugin nodes {figures['plugin_nodes']}"
        )
    if any(build.uses_plugin for build in builds):
        plugin_graphs = ",".join(build.graph for build in builds if build.uses_plugin)
        engine = f"unidg export engine --bundle {shlex.quote(str(bundle.path))} --graphs {plugin_graphs}"
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
    lines.append(f"mkdir -p {shlex.quote(str(out / 'engines'))}")
    for build in builds:
        lines.append(f"# {build.graph}: build (log: {build_log(build)}, read by `unidg export adopt`)")
        command = (
            shlex.join(build_command(build, out, trtexec)) + f" 2>&1 | tee {shlex.quote(str(out / build_log(build)))}"
        )
        lines.append(f"# {command}" if build.uses_plugin else command)
    for build in builds:
        lines.append(f"# {build.graph}: profile (per-layer times)")
        lines.append(shlex.join(profile_command(build, out, trtexec)))
    lines.append(
        f"# then: unidg export adopt --bundle {shlex.quote(str(bundle.path))} --plans {shlex.quote(str(out))} --out NEW"
    )
    script = "\n".join(lines) + "\n"
    (out / "engines").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / TRTEXEC_SCRIPT, script)
    text = json.dumps(description(bundle, request, builds, out, census), indent=2) + "\n"
    atomic_write_text(out / TRTEXEC_DESCRIPTION, text)
    return script


def _graph_only(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def _changes(build: GraphBuild) -> str:
    derivation, changes = build.derivation, []
    if derivation.attention == "plugin":
        changes.append("attention as the plugin node")
    elif derivation.attention == "native":
        changes.append(f"{derivation.attention_mask} attention mask")
    if derivation.decomposable:
        changes.append("TRT_decomposable=1")
    if derivation.fp32_resize and low_precision_resizes(_graph_only(build.source)):
        changes.append("bf16 Resize in fp32")
    return ", ".join(changes)
