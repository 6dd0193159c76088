"""Build TensorRT engines (serialized plans) for a bundle with the TensorRT Python API.

The TensorRT layer is thin and follows NVIDIA's documented API: ``trt.Builder`` -> ``create_network`` (strongly typed
for graphs that carry their own precision: Q/DQ FP8/INT8 bundles and fp16/bf16 exports) -> ``trt.OnnxParser
.parse_from_file`` (reads external data beside the graph) -> ``IBuilderConfig`` (optimization profile per graph from
the manifest's shapes, builder optimization level, timing cache, optional refit / weight-stripped plans, version or
hardware compatibility) -> ``build_serialized_network``. ``tensorrt`` is imported only when a build runs.

Everything that does not need TensorRT is plain Python: which precision mode a bundle allows, the optimization
profile (min/opt/max shape of every input) computed from the manifest, plan names, and the manifest ``engines``
table the runtime's TensorRT backend reads (TensorRT version, GPU compute capability, plan sha256).

A bundle with step-cache graphs (format 2, ``unidg export cache-graphs``) gets plans for them too by default:
``step_head`` and ``step_tail`` hold attention and take the step graph's attention form (native with the key-only
mask, or the plugin), ``step_cached`` has none.
"""

from __future__ import annotations

import importlib.metadata
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from unidg.core.errors import UniDGError
from unidg.core.manifest import atomic_write_bytes, read_manifest, sha256_file, write_manifest
from unidg.core.settings import MAX_RESOLUTION
from unidg.export.onnx_export import Progress, print_progress
from unidg.export.plugins.trt_plugin import register_plugin
from unidg.export.tensorrt_graphs import ATTENTION_MASKS, GraphDerivation, derive_graph_file
from unidg.runtime.backends.tensorrt_engines import MIN_TENSORRT_VERSION, tensorrt_version_problem
from unidg.runtime.bundle import (
    ALL_GRAPH_INPUTS,
    CACHE_GRAPH_NAMES,
    GRAPH_NAMES,
    Bundle,
    bundle_graph_names,
    bundle_shapes,
    load_bundle,
)

ENGINE_DIR = "engines"
PRECISION_FLAGS = ("fp8", "int8", "bf16", "fp16")
QUANTIZED = ("fp8", "int8")
HARDWARE_LEVELS = ("none", "same_compute_capability", "ampere_plus")
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's default; 5 searches longest
TRTEXEC_MAJORS = (10, 11)  # trtexec dialects the printed commands can target
# Without TensorRT installed: TensorRT 10's dialect, the oldest the `[tensorrt]` extra allows (>= 10.15); TensorRT 11's
# trtexec still accepts its --stronglyTyped and profiling options (deprecated no-ops).
DEFAULT_TRTEXEC_MAJOR = 10
# Neither tensorrt.plugin nor Torch-TensorRT documents raising a kernel's dynamic shared-memory limit for AOT plugin
# kernels, so by default only tactics within the 48 KiB every launch gets are offered.
PLUGIN_DEFAULT_MAX_SHARED_BYTES = 49152
# How the step graph's attention reaches TensorRT: "native" = opset-23 Attention with a key-only [B, 1, 1, S] mask
# (TensorRT's attention layer broadcasts it), "plugin" = the unidg::biased_attention node.
ATTENTION_BUILDS = ("native", "plugin")
# The graphs whose attention a TensorRT build derives: the step, and the step-cache graphs that hold its blocks.
ATTENTION_GRAPHS = ("step", "step_head", "step_tail")


class EngineError(UniDGError):
    """The engine build cannot be done as asked; the message names the option and the fix."""


class TensorRTUnavailable(EngineError):
    """``tensorrt`` is not installed (it needs NVIDIA's package index and a CUDA GPU)."""


@dataclass(frozen=True)
class EngineRequest:
    precision: str | None = None  # None: what the bundle carries; "bf16"/"fp16": let TensorRT pick for fp32 bundles
    dynamic: bool | None = None  # None: as the bundle (static bundle -> static profile)
    min_batch: int = 1
    opt_batch: int | None = None  # default: the bundle's batch, or 1 for a dynamic one
    max_batch: int | None = None  # default: the bundle's batch, or its export-time max_batch
    min_resolution: int | None = None  # dynamic-sequence bundles only
    max_resolution: int | None = None
    optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL
    timing_cache: Path | None = None
    refit: bool = False
    strip_weights: bool = False  # weight-stripped plan: refit from the bundle's ONNX weights at load time
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    workspace_gb: float | None = None
    graphs: tuple[str, ...] | None = None  # None: every graph of the bundle (its step-cache graphs included)
    plugin_large_shared_memory: bool = False  # also offer plugin tactics above 48 KiB of dynamic shared memory
    trtexec_major: int | None = None  # dialect of the printed trtexec commands; None: the installed TensorRT's
    attention: str | None = None  # None: "native", or "plugin" for a bundle exported with the plugin node
    attention_mask: str = "key"  # native step attention: key-only [B, 1, 1, S] or full [B, 1, S, S] mask
    decomposable: bool = False  # TRT_decomposable = 1 on every Attention node TensorRT parses

    def __post_init__(self) -> None:
        if self.precision is not None and self.precision not in PRECISION_FLAGS:
            raise EngineError(f"precision flag {self.precision!r}: choose one of {list(PRECISION_FLAGS)}")
        if not 0 <= self.optimization_level <= 5:
            raise EngineError(f"--optimization-level {self.optimization_level}: TensorRT accepts 0..5 (default 3)")
        if self.hardware_compatibility not in HARDWARE_LEVELS:
            raise EngineError(f"--hardware-compatibility {self.hardware_compatibility!r}: one of {HARDWARE_LEVELS}")
        if self.attention is not None and self.attention not in ATTENTION_BUILDS:
            raise EngineError(f"--attention {self.attention!r}: choose one of {list(ATTENTION_BUILDS)}")
        if self.trtexec_major is None:
            object.__setattr__(self, "trtexec_major", installed_tensorrt_major() or DEFAULT_TRTEXEC_MAJOR)
        if self.trtexec_major not in TRTEXEC_MAJORS:
            raise EngineError(f"--tensorrt-major {self.trtexec_major}: the trtexec commands target {TRTEXEC_MAJORS}")
        if self.attention_mask not in ATTENTION_MASKS:
            raise EngineError(f"--attention-mask {self.attention_mask!r}: choose one of {list(ATTENTION_MASKS)}")
        if self.attention == "plugin" and self.attention_mask != "key":
            raise EngineError(
                "--attention-mask full with --attention plugin: the plugin takes a per-key bias [B, S], no mask; "
                "drop one of the two"
            )
        known = (*GRAPH_NAMES, *CACHE_GRAPH_NAMES)
        unknown = [g for g in self.graphs or () if g not in known]
        if unknown:
            raise EngineError(f"unknown graphs {unknown}; a bundle has {list(known)}")
        if self.workspace_gb is not None and not (math.isfinite(self.workspace_gb) and self.workspace_gb > 0):
            raise EngineError(f"--workspace-gb {self.workspace_gb}: give a finite number of GiB > 0 (e.g. 8)")
        for flag, value in (
            ("--min-batch", self.min_batch),
            ("--opt-batch", self.opt_batch),
            ("--max-batch", self.max_batch),
        ):
            if value is not None and value < 1:
                raise EngineError(f"{flag} {value}: must be >= 1")
        for flag, value in (("--min-resolution", self.min_resolution), ("--max-resolution", self.max_resolution)):
            if value is not None and not (16 <= value <= MAX_RESOLUTION and value % 16 == 0):
                raise EngineError(f"{flag} {value}: must be a multiple of 16 in 16..{MAX_RESOLUTION}")


def installed_tensorrt_major() -> int | None:
    """Major version of the installed ``tensorrt`` distribution (read from its metadata; nothing is imported)."""
    try:
        return int(importlib.metadata.version("tensorrt").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


@dataclass(frozen=True)
class Profile:
    """min/opt/max shape of every input of one graph (one TensorRT optimization profile)."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    batch: tuple[int, int]  # [min, max]
    resolution: tuple[int, int]  # [min, max]

    @property
    def static(self) -> bool:
        return all(lo == opt == hi for lo, opt, hi in self.shapes.values())


@dataclass(frozen=True)
class GraphBuild:
    """Everything needed to build (or print the trtexec command for) one plan."""

    graph: str
    onnx: Path
    plan: str  # relative to the bundle
    profile: Profile
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # names of trt.BuilderFlag members to set
    uses_plugin: bool
    plugin_max_shared_bytes: int | None = None  # plugin tactics offered up to this much shared memory (None: all)
    options: EngineRequest = field(repr=False, default_factory=EngineRequest)
    attention: str | None = None  # step graph only: "native" or "plugin"
    source: Path | None = None  # the bundle graph ``onnx`` is derived from (None: ``onnx`` is the bundle's own)
    derivation: GraphDerivation | None = None
    attention_form: str | None = None  # the bundle's step attention form ("expand"/"fold")

    def prepare_graph(self) -> dict | None:
        """Write the TensorRT form of the graph (graph only: the weights stay in the bundle graph's external data,
        linked beside it); returns its census, or None when TensorRT parses the bundle's own graph."""
        if self.derivation is None:
            return None
        return derive_graph_file(self.source, self.onnx, self.derivation, self.attention_form)


# ------------------------------------------------------------------------------------------------ precision
def precision_mode(bundle: Bundle, requested: str | None) -> tuple[bool, tuple[str, ...]]:
    """(strongly typed?, builder precision flags) for a bundle and the requested precision flag.

    Graphs that carry their precision (Q/DQ, fp16/bf16 weights) build strongly typed: TensorRT then follows the
    graph's types exactly (precision flags are not allowed with strong typing). An fp32 bundle may ask TensorRT
    to choose bf16/fp16 kernels itself (weakly typed, TensorRT 10 only).
    """
    carried = bundle.precision
    if requested in QUANTIZED and carried != requested:
        maker = f"`unidg export quantize --format {requested}`"
        raise EngineError(
            f"--{requested} needs a bundle with {requested.upper()} Q/DQ nodes (made by {maker}); "
            f"{bundle.path} is {carried}"
        )
    if carried in ("fp8", "int8", "fp16", "bf16"):
        if requested in ("bf16", "fp16") and requested != carried:
            raise EngineError(
                f"--{requested} on a {carried} bundle: its graphs already fix their precision (strongly typed); "
                f"drop --{requested} or export the bundle with --precision {requested}"
            )
        return True, ()
    if requested in ("bf16", "fp16"):
        return False, (requested.upper(),)
    return True, ()


# ------------------------------------------------------------------------------------------------ profiles
def _batch_range(bundle: Bundle, request: EngineRequest, dynamic: bool) -> tuple[int, int, int]:
    if not dynamic:
        fixed = bundle.batch if bundle.batch is not None else (request.opt_batch or 1)
        return fixed, fixed, fixed
    if bundle.batch is not None:
        lo = hi = opt = bundle.batch  # a static-batch graph: only the sequence may vary
        return lo, opt, hi
    hi = request.max_batch or int(bundle.metadata.get("max_batch", 4))
    opt = request.opt_batch or 1
    lo = request.min_batch
    if not 1 <= lo <= opt <= hi:
        raise EngineError(f"batch profile {lo}/{opt}/{hi}: need 1 <= min <= opt <= max")
    limit = bundle.metadata.get("max_batch")
    if limit is not None and hi > int(limit):
        raise EngineError(f"--max-batch {hi} exceeds the bundle's exported batch bound {limit}")
    return lo, opt, hi


def _resolution_range(bundle: Bundle, request: EngineRequest, dynamic: bool) -> tuple[int, int, int]:
    s = bundle.resolution
    sequence_dynamic = bundle.metadata.get("sequence") == "dynamic"
    if not dynamic or not sequence_dynamic:
        if request.min_resolution not in (None, s) or request.max_resolution not in (None, s):
            raise EngineError(
                f"bundle {bundle.path.name} is static at S={s}; --min/--max-resolution need a bundle exported with "
                "--sequence dynamic"
            )
        return s, s, s
    lo = request.min_resolution or s
    hi = request.max_resolution or s
    for value, flag in ((lo, "--min-resolution"), (hi, "--max-resolution")):
        if value < 16 or value % 16:
            raise EngineError(f"{flag} {value} is not a positive multiple of 16")
    if not lo <= s <= hi:
        raise EngineError(f"resolution profile {lo}..{hi} must contain the bundle's resolution {s}")
    return lo, s, hi


def profile_for(bundle: Bundle, graph: str, request: EngineRequest) -> Profile:
    """The optimization profile of ``graph``: input shapes at (min batch, min S), (opt, S), (max batch, max S)."""
    dynamic = request.dynamic
    if dynamic is None:
        dynamic = bundle.batch is None or bundle.metadata.get("sequence") == "dynamic"
    if dynamic and bundle.batch is not None and bundle.metadata.get("sequence") != "dynamic":
        raise EngineError(
            f"--dynamic: bundle {bundle.path.name} is static (batch {bundle.batch}, S={bundle.resolution}); "
            "re-export it with --batch dynamic and/or --sequence dynamic"
        )
    batches = _batch_range(bundle, request, dynamic)
    resolutions = _resolution_range(bundle, request, dynamic)
    corners = []
    for batch, resolution in zip(batches, resolutions):
        meta = {**bundle.metadata, "resolution": resolution}
        corners.append(bundle_shapes(meta, batch)[graph])
    shapes = {
        name: tuple(tuple(int(d) for d in corner[name]) for corner in corners) for name in ALL_GRAPH_INPUTS[graph]
    }
    return Profile(shapes=shapes, batch=(batches[0], batches[2]), resolution=(resolutions[0], resolutions[2]))


def refit_flags(refit: bool, strip_weights: bool) -> list[str]:
    """Builder flags for refittable / weight-stripped plans, as trtexec sets them for --refit / --stripWeights.

    A stripped plan is refit with the very weights it was built from, so it is built REFIT_IDENTICAL (TensorRT may
    then optimise as for fixed weights; NVIDIA's refit docs warn that plain REFIT can drop a GEMM bias). Only an
    explicit --refit asks for weights that may change (trtexec: --stripWeights with --refit uses REFIT).
    """
    flags = ["REFIT"] if refit else []
    if strip_weights:
        flags += ["STRIP_PLAN"] if refit else ["STRIP_PLAN", "REFIT_IDENTICAL"]
    return flags


def _check_hardware_compatibility(bundle: Bundle, request: EngineRequest, uses_plugin: bool) -> None:
    if request.hardware_compatibility != "ampere_plus":
        return
    if uses_plugin:
        raise EngineError(
            "--hardware-compatibility ampere_plus with the attention plugin: the plugin embeds PTX compiled for the "
            "build GPU's SM (sm_90a PTX cannot be JIT-compiled for sm_80/89/100); build with native attention "
            "(--attention native) or drop --hardware-compatibility"
        )
    if bundle.precision == "fp8":
        raise EngineError(
            "--hardware-compatibility ampere_plus on an FP8 bundle: FP8 kernels need sm_89 or later, which an "
            "Ampere-compatible plan cannot use; drop --hardware-compatibility or use an int8/bf16 bundle"
        )


def step_attention(bundle: Bundle, requested: str | None) -> tuple[str, str | None]:
    """(attention built, attention rewrite of the derived step graph or None).

    The bundle keeps the form onnxruntime runs (Attention with the mask expanded to [B, 1, S, S]); a TensorRT build
    derives its own: native Attention (fed the key-only [B, 1, 1, S] mask or the full one, ``--attention-mask``),
    or the plugin node.
    """
    if bundle.metadata.get("attention") == "plugin":
        if requested == "native":
            raise EngineError(
                f"--attention native: {bundle.path.name} was exported with the plugin node; re-export it with "
                "--attention portable (the default) to build native attention"
            )
        return "plugin", None
    attention = requested or "native"
    return attention, attention


def _derived_name(source: Path, derivation: GraphDerivation) -> str:
    return f"{source.stem}.{derivation.suffix()}.onnx"


def requested_graphs(bundle: Bundle, request: EngineRequest) -> tuple[str, ...]:
    """The graphs a build makes plans for: the request's, or every graph of the bundle; refuses a step-cache graph
    the bundle does not have."""
    if request.graphs is None:
        return bundle_graph_names(bundle)
    absent = [g for g in request.graphs if g in CACHE_GRAPH_NAMES and not bundle.cache_graphs]
    if absent:
        raise EngineError(
            f"--graphs {','.join(absent)}: bundle {bundle.path.name} has no step-cache graphs; add them with "
            "`unidg export cache-graphs`, or leave them out of --graphs"
        )
    return tuple(request.graphs)


def plan_builds(bundle: Bundle, request: EngineRequest, graph_dir: Path | None = None) -> list[GraphBuild]:
    """What to build for each requested graph (no TensorRT needed). Graphs TensorRT needs in another form than the
    bundle's (``unidg.export.tensorrt_graphs``) are planned in ``graph_dir`` (default: beside the bundle's)."""
    strongly_typed, flags = precision_mode(bundle, request.precision)
    graph_dir = Path(graph_dir) if graph_dir is not None else bundle.path
    attention_form = bundle.metadata.get("attention_form")
    builds = []
    for graph in requested_graphs(bundle, request):
        graph_flags = list(flags) + refit_flags(request.refit, request.strip_weights)
        if request.version_compatible:
            graph_flags.append("VERSION_COMPATIBLE")
        attention, rewrite = (None, None)
        if graph in ATTENTION_GRAPHS:
            attention, rewrite = step_attention(bundle, request.attention)
        uses_plugin = attention == "plugin"
        _check_hardware_compatibility(bundle, request, uses_plugin)
        source = bundle.graph_path(graph)
        derivation = GraphDerivation(
            attention=rewrite, attention_mask=request.attention_mask, decomposable=request.decomposable
        )
        if not derivation.changes(onnx.load(str(source), load_external_data=False), attention_form):
            derivation = None
        max_shared = None if request.plugin_large_shared_memory else PLUGIN_DEFAULT_MAX_SHARED_BYTES
        builds.append(
            GraphBuild(
                graph=graph,
                onnx=graph_dir / _derived_name(source, derivation) if derivation else source,
                plan=f"{ENGINE_DIR}/{graph}.plan",
                profile=profile_for(bundle, graph, request),
                strongly_typed=strongly_typed,
                builder_flags=tuple(graph_flags),
                uses_plugin=uses_plugin,
                plugin_max_shared_bytes=max_shared if uses_plugin else None,
                options=request,
                attention=attention,
                source=source if derivation else None,
                derivation=derivation,
                attention_form=attention_form,
            )
        )
    return builds


def engine_entry(build: GraphBuild, plan_sha256: str, seconds: float) -> dict:
    """One plan's entry in the manifest ``engines.plans`` table."""
    return {
        "file": build.plan,
        "sha256": plan_sha256,
        "batch": list(build.profile.batch),
        "resolution": list(build.profile.resolution),
        "strongly_typed": build.strongly_typed,
        "builder_flags": list(build.builder_flags),
        "optimization_level": build.options.optimization_level,
        "refittable": "REFIT" in build.builder_flags,
        "weight_stripped": "STRIP_PLAN" in build.builder_flags,
        "plugin": build.uses_plugin,
        "onnx": build.onnx.name,  # the graph the plan was parsed from (and a stripped plan is refit from)
        **({"attention": build.attention} if build.attention else {}),
        **({"attention_mask": build.options.attention_mask} if build.attention == "native" else {}),
        **({"decomposable": True} if build.derivation and build.derivation.decomposable else {}),
        "build_seconds": round(seconds, 1),
    }


def engines_table(
    plans: dict[str, dict], tensorrt_version: str, compute_capability: tuple[int, int], device_name: str,
    request: EngineRequest,
) -> dict:  # fmt: skip
    """The manifest ``engines`` table (read by unidg.runtime.backends.tensorrt_engines.parse_engines)."""
    return {
        "tensorrt_version": tensorrt_version,
        "compute_capability": list(compute_capability),
        "device_name": device_name,
        "version_compatible": request.version_compatible,
        "hardware_compatibility": request.hardware_compatibility,
        "plans": plans,
    }


def record_engines(bundle_path: Path, table: dict) -> None:
    """Write ``table`` into the bundle manifest and re-hash the folder (plans included)."""
    manifest = read_manifest(bundle_path, kind="bundle")
    metadata = dict(manifest.metadata)
    previous = metadata.get("engines") or {}
    same_target = all(previous.get(k) == table.get(k) for k in ("tensorrt_version", "compute_capability"))
    # Plans of another TensorRT or GPU are dropped: one table describes one build target.
    plans = {**previous.get("plans", {}), **table["plans"]} if previous and same_target else table["plans"]
    kept = {entry["file"] for entry in plans.values()}
    for entry in previous.get("plans", {}).values():
        if entry.get("file") not in kept:
            (Path(bundle_path) / entry["file"]).unlink(missing_ok=True)
    metadata["engines"] = {**table, "plans": plans}
    write_manifest(bundle_path, "bundle", metadata)


# ------------------------------------------------------------------------------------------------ TensorRT
def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as error:
        needed = ".".join(str(part) for part in MIN_TENSORRT_VERSION)
        raise TensorRTUnavailable(
            f"tensorrt is not installed: engine builds need NVIDIA TensorRT (>= {needed}) and a CUDA GPU; install "
            "`unidg[tensorrt]` on the target machine, or print the equivalent commands with `unidg export trtexec`"
        ) from error
    problem = tensorrt_version_problem(trt.__version__)
    if problem:
        raise EngineError(problem)
    return trt


def gpu_identity() -> tuple[tuple[int, int], str]:
    """(compute capability, name) of CUDA device 0: the GPU the plan is built for."""
    import torch

    if not torch.cuda.is_available():
        raise EngineError("no CUDA GPU visible: TensorRT builds plans for the GPU it runs on")
    return tuple(torch.cuda.get_device_capability(0)), torch.cuda.get_device_name(0)


def _network_flags(trt, strongly_typed: bool) -> int:
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if strongly_typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)  # TensorRT 11: always strongly typed, the flag is ignored
    return flags


def _builder_flag(trt, name: str):
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise EngineError(
            f"this TensorRT ({trt.__version__}) has no BuilderFlag.{name}; "
            + (
                "TensorRT 11 builds strongly typed only: export the bundle with --precision bf16/fp16 instead"
                if name in ("BF16", "FP16")
                else "use a newer TensorRT"
            )
        )
    return flag


def _progress_monitor(trt, progress: Progress):
    """TensorRT's IProgressMonitor reporting top-level build phases as progress lines."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            if parent_phase is None:
                progress(f"  TensorRT: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step) -> bool:
            return True  # False would cancel the build

        def phase_finish(self, phase_name) -> None:
            pass

    return Monitor()


def refit_engine(trt, engine, onnx_path: Path, logger) -> None:
    """Put the weights of ``onnx_path`` into a refittable or weight-stripped engine (TensorRT's ONNX refitter)."""
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors))
        raise EngineError(f"refitting from {onnx_path} failed: {errors}")
    if not refitter.refit_cuda_engine():
        raise EngineError(f"TensorRT refused to refit the engine with the weights of {onnx_path}")


def build_plan(trt, build: GraphBuild, logger, timing_cache_bytes: bytes | None, progress: Progress | None):
    """Build one serialized plan; returns (plan bytes, serialized timing cache)."""
    if build.uses_plugin:
        register_plugin(max_shared_bytes=build.plugin_max_shared_bytes)  # found by op type + namespace
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, build.strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(build.onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {build.onnx}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = build.options.optimization_level
    for name in build.builder_flags:
        config.set_flag(_builder_flag(trt, name))
    if build.options.hardware_compatibility != "none":
        level = build.options.hardware_compatibility.upper()
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)
    if build.options.workspace_gb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(build.options.workspace_gb * 2**30))
    cache = config.create_timing_cache(timing_cache_bytes or b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in build.profile.shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    if progress is not None and hasattr(trt, "IProgressMonitor"):
        config.progress_monitor = _progress_monitor(trt, progress)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build {build.graph} (see the TensorRT log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_engines(
    bundle_path: str | Path, request: EngineRequest, *, progress: Progress | None = print_progress
) -> dict:
    """``unidg export engine``: build the plans of a bundle, record them in its manifest; returns the engines table."""
    trt = import_tensorrt()
    bundle = load_bundle(bundle_path, verify=True)
    builds = plan_builds(bundle, request)
    capability, device_name = gpu_identity()
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = request.timing_cache
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else None
    plans = {}
    for build in builds:
        if progress:
            kind = "strongly typed" if build.strongly_typed else f"flags {list(build.builder_flags)}"
            progress(f"building {build.plan} ({kind}, batch {build.profile.batch}, S {build.profile.resolution})")
        started = time.perf_counter()
        build.prepare_graph()
        plan, cache_bytes = build_plan(trt, build, logger, cache_bytes, progress)
        target = bundle.path / build.plan
        atomic_write_bytes(target, plan)
        plans[build.graph] = engine_entry(build, sha256_file(target), time.perf_counter() - started)
        if cache_path is not None:
            atomic_write_bytes(cache_path, cache_bytes)
    table = engines_table(plans, trt.__version__, capability, device_name, request)
    record_engines(bundle.path, table)
    if progress:
        progress(f"recorded {len(plans)} plans in {bundle.path / 'manifest.json'} (TensorRT {trt.__version__})")
    return table
