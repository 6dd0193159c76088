"""The TensorRT backend's plain-Python half: the manifest's ``engines`` table, the checks that refuse plans built by
another TensorRT or for another GPU, and the arithmetic of bindings, sigma tables and the ping-pong loop. Nothing here
needs TensorRT or a GPU, so all of it is tested without them (and the exporter reads the same table with it).

Manifest ``engines`` table (written beside the ONNX graphs when engines are built):

    "engines": {"tensorrt_version": "10.13.0.35", "compute_capability": [9, 0], "device_name": "NVIDIA H100 ...",
                "version_compatible": false, "hardware_compatibility": "none",
                "plans": {"step": {"file": "engines/step.plan", "batch": [1, 4]}, "vae_encoder": {...}, ...}}

Per-plan entries may override any top-level key; ``batch`` is the optimization profile's [min, max] batch (absent:
the bundle's static batch); ``weight_stripped`` plans are refitted from the bundle's ONNX graph when loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from unidg.runtime.backends.base import BackendError
from unidg.runtime.bundle import (
    ALL_GRAPH_INPUTS,
    ALL_GRAPH_OUTPUTS,
    CACHE_GRAPH_NAMES,
    GRAPH_NAMES,
    Bundle,
    bundle_shapes,
)

HARDWARE_LEVELS = ("none", "same_compute_capability", "ampere_plus")
# Cross-major runs NVIDIA supports for version-compatible plans (builder major -> runtime major).
CROSS_MAJOR = {(8, 9), (8, 10), (10, 11)}
FLOAT_BYTES = 4
# Every bundle graph is opset 23: TensorRT's ONNX parser imports `Attention` from 10.14 and `RMSNormalization` from
# 10.15 (TensorRT CHANGELOG), so older releases fail at parse.
MIN_TENSORRT_VERSION = (10, 15)
# IExecutionContext::setTensorAddress requires addresses aligned to 256 bytes (NvInferRuntime.h).
TENSOR_ADDRESS_ALIGNMENT = 256


class EngineMismatchError(BackendError):
    """A TensorRT plan was built by another TensorRT version or for another GPU than this machine's."""


@dataclass(frozen=True)
class EngineSpec:
    graph: str
    file: str
    tensorrt_version: str
    compute_capability: tuple[int, int]
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    batch: tuple[int, int] | None = None  # optimization profile [min, max]; None: the bundle's static batch
    device_name: str | None = None
    weight_stripped: bool = False  # the plan carries no weights: refit from the bundle's ONNX graph at load
    plugin: bool = False  # embeds the AOT attention kernel, whose PTX targets the build GPU's exact SM
    onnx: str | None = None  # the graph the plan was parsed from (a stripped plan is refit from it); None: the bundle's


def parse_version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in str(text).split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    if not parts:
        raise ValueError(f"not a version: {text!r}")
    return tuple(parts)


def parse_compute_capability(value: object) -> tuple[int, int]:
    """[9, 0], "9.0", "sm_90", "90", 9.0 -> (9, 0)."""
    if isinstance(value, list | tuple) and len(value) == 2:
        return int(value[0]), int(value[1])
    text = str(value).lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, minor = text.split(".", 1)
        return int(major), int(minor or 0)
    if text.isdigit() and len(text) >= 2:
        return int(text[:-1]), int(text[-1])
    raise ValueError(f"not a compute capability: {value!r} (expected e.g. [9, 0], '9.0' or 'sm_90')")


def parse_engines(bundle: Bundle) -> dict[str, EngineSpec]:
    """The bundle's TensorRT plans, one per graph; refuses a bundle without a complete, well-formed table.

    The four graphs of format 1 need plans; the step-cache graphs' plans are optional (without all three the backend
    declines step caching), and refused on a bundle that has no step-cache graphs."""
    table = bundle.engines
    if not table:
        raise BackendError(
            f"bundle {bundle.path} has no TensorRT engines (manifest 'engines' is empty); build them on the target GPU "
            "with the export tools, or run this bundle with --backend onnxruntime"
        )
    plans = table.get("plans", {name: table[name] for name in GRAPH_NAMES if name in table})
    missing = [name for name in GRAPH_NAMES if name not in plans]
    if missing:
        raise BackendError(f"bundle {bundle.path}: manifest 'engines' lacks plans for {missing}")
    cache_plans = [name for name in CACHE_GRAPH_NAMES if name in plans]
    if cache_plans and not bundle.cache_graphs:
        raise BackendError(
            f"bundle {bundle.path}: manifest 'engines' has plans for {cache_plans} but the bundle has no step-cache "
            "graphs (format_version 1); rebuild the engines for this bundle"
        )
    specs = {}
    for name in (*GRAPH_NAMES, *cache_plans):
        entry = {**{k: v for k, v in table.items() if k != "plans"}, **plans[name]}
        where = f"bundle {bundle.path}: engine '{name}'"
        try:
            file = str(entry["file"])
            version = str(entry["tensorrt_version"])
            parse_version(version)
            capability = parse_compute_capability(entry["compute_capability"])
        except KeyError as error:
            raise BackendError(f"{where} lacks {error.args[0]!r} in the manifest") from None
        except ValueError as error:
            raise BackendError(f"{where}: {error}") from None
        if file not in bundle.files:
            raise BackendError(f"{where}: plan {file} is not listed in the manifest's files (sha256 unchecked)")
        if entry.get("onnx") is not None and entry["onnx"] not in bundle.files:
            raise BackendError(f"{where}: its graph {entry['onnx']} is not listed in the manifest's files")
        level = str(entry.get("hardware_compatibility", "none")).lower()
        if level not in HARDWARE_LEVELS:
            raise BackendError(f"{where}: hardware_compatibility {level!r} is not one of {list(HARDWARE_LEVELS)}")
        batch = entry.get("batch")
        if batch is not None:
            if not (isinstance(batch, list | tuple) and len(batch) == 2 and 1 <= int(batch[0]) <= int(batch[1])):
                raise BackendError(f"{where}: batch {batch!r} must be [min, max] with 1 <= min <= max")
            batch = (int(batch[0]), int(batch[1]))
        elif bundle.batch is None:
            raise BackendError(f"{where}: a dynamic-batch bundle needs the plan's profile 'batch': [min, max]")
        specs[name] = EngineSpec(
            graph=name,
            file=file,
            tensorrt_version=version,
            compute_capability=capability,
            version_compatible=bool(entry.get("version_compatible", False)),
            hardware_compatibility=level,
            batch=batch,
            device_name=entry.get("device_name"),
            weight_stripped=bool(entry.get("weight_stripped", False)),
            plugin=bool(entry.get("plugin", False)),
            onnx=entry.get("onnx"),
        )
        if specs[name].plugin and level == "ampere_plus":
            raise BackendError(
                f"{where}: a plan with the attention plugin cannot be hardware-compatible (its kernel is PTX for "
                "the build GPU's SM only); rebuild it without --hardware-compatibility ampere_plus"
            )
    return specs


def tensorrt_version_problem(version: str) -> str | None:
    """Why TensorRT ``version`` cannot build or run bundle graphs, or None when it can."""
    if parse_version(version)[:2] >= MIN_TENSORRT_VERSION:
        return None
    needed = ".".join(str(part) for part in MIN_TENSORRT_VERSION)
    return (
        f"TensorRT {version} is installed, but bundle graphs (ONNX opset 23: Attention, RMSNormalization) need "
        f"TensorRT >= {needed}; install a newer `tensorrt` (`pip install 'unidg[tensorrt]'`)"
    )


def check_engine_compatibility(
    spec: EngineSpec, runtime_version: str, device_capability: tuple[int, int], device_name: str = "this GPU"
) -> None:
    """Refuse a plan this TensorRT / GPU cannot run (NVIDIA: plans are tied to the TensorRT version that built them
    unless built version-compatible, and to the GPU's compute capability unless built hardware-compatible)."""
    built, running = parse_version(spec.tensorrt_version), parse_version(runtime_version)
    rebuild = "rebuild the engines on this machine (same TensorRT, same GPU) or use --backend onnxruntime"
    if spec.version_compatible:
        ok = built >= (8, 6) and running >= built and (built[0] == running[0] or (built[0], running[0]) in CROSS_MAJOR)
        if not ok:
            raise EngineMismatchError(
                f"engine {spec.file} was built version-compatible with TensorRT {spec.tensorrt_version}, which "
                f"TensorRT {runtime_version} cannot run (needs a runtime of the same or a supported later major, "
                f"not older than the builder); {rebuild}"
            )
    else:
        common = min(len(built), len(running), 4)
        if built[:common] != running[:common]:
            raise EngineMismatchError(
                f"engine {spec.file} was built with TensorRT {spec.tensorrt_version} but this is TensorRT "
                f"{runtime_version}; plans only run on the TensorRT version that built them; {rebuild}"
            )
    major_minor = tuple(device_capability)
    if spec.plugin and major_minor != spec.compute_capability:
        raise EngineMismatchError(
            f"engine {spec.file} embeds the attention plugin's kernel compiled for sm_{spec.compute_capability[0]}"
            f"{spec.compute_capability[1]} (PTX for that SM only), but {device_name} is "
            f"sm_{major_minor[0]}{major_minor[1]}; {rebuild}"
        )
    if spec.hardware_compatibility == "ampere_plus":
        if major_minor < (8, 0):
            raise EngineMismatchError(
                f"engine {spec.file} is hardware-compatible for Ampere and later (sm_80+), but {device_name} is "
                f"sm_{major_minor[0]}{major_minor[1]}; {rebuild}"
            )
    elif major_minor != spec.compute_capability:
        built_for = spec.device_name or "another GPU"
        raise EngineMismatchError(
            f"engine {spec.file} was built for compute capability {spec.compute_capability[0]}."
            f"{spec.compute_capability[1]} ({built_for}) but {device_name} is {major_minor[0]}.{major_minor[1]}; "
            f"{rebuild}"
        )


def check_batch(spec: EngineSpec, bundle: Bundle, batch: int) -> None:
    if spec.batch is None:
        if batch != bundle.batch:
            raise BackendError(f"engine {spec.file} runs batch {bundle.batch} only (got {batch})")
    elif not spec.batch[0] <= batch <= spec.batch[1]:
        raise BackendError(
            f"engine {spec.file} was built for batch {spec.batch[0]}..{spec.batch[1]} (got {batch}); "
            "lower --batch-size or rebuild the engine with a larger profile"
        )


def binding_shapes(bundle: Bundle, graph: str, batch: int) -> dict[str, tuple[int, ...]]:
    """Concrete shape of every input and output tensor of ``graph`` (a step-cache graph too) for ``batch`` requests."""
    shapes = bundle_shapes(bundle.metadata, batch)[graph]
    return {name: tuple(int(d) for d in shapes[name]) for name in (*ALL_GRAPH_INPUTS[graph], *ALL_GRAPH_OUTPUTS[graph])}


def binding_bytes(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Device bytes of each float32 binding."""
    return {name: int(np.prod(shape, dtype=np.int64)) * FLOAT_BYTES for name, shape in shapes.items()}


def sigma_row_stride(batch: int) -> int:
    """Bytes between rows of the device sigma table: one row (``batch`` floats) rounded up to 256 bytes, so every
    row address handed to ``set_tensor_address`` is aligned as TensorRT requires."""
    row = batch * FLOAT_BYTES
    return -(-row // TENSOR_ADDRESS_ALIGNMENT) * TENSOR_ADDRESS_ALIGNMENT


def sigma_table(sigmas: np.ndarray, batch: int) -> np.ndarray:
    """The host image of the device sigma table: row i holds sigma_i for every sample, zero-padded to the stride."""
    sigmas = np.asarray(sigmas, np.float32)
    table = np.zeros((len(sigmas), sigma_row_stride(batch) // FLOAT_BYTES), np.float32)
    table[:, :batch] = sigmas[:, None]
    return table


def sigma_addresses(table_address: int, steps: int, batch: int) -> list[tuple[int, int]]:
    """(sigma, sigma_next) device addresses of each step in a sigma table at ``table_address`` (cudaMalloc
    returns 256-byte aligned memory)."""
    stride = sigma_row_stride(batch)
    return [(table_address + i * stride, table_address + (i + 1) * stride) for i in range(steps)]


def loop_plan(steps: int) -> list[tuple[int, int, int]]:
    """For each step i: (x buffer read, x buffer written, sigma row); x ping-pongs between buffers 0 and 1, and the
    step reads sigma row i and sigma_next row i + 1 of the (steps + 1, B) sigma table. The result is in buffer
    ``steps % 2``."""
    return [(i % 2, (i + 1) % 2, i) for i in range(steps)]


def tensorrt_step_cache_problem(bundle: Bundle, engines: set[str], cuda_graph: bool = False) -> str | None:
    """Why the TensorRT backend with plans for ``engines`` cannot run ``bundle``'s step caching, or None."""
    if not bundle.cache_graphs:
        return (
            f"bundle {bundle.path} has no step-cache graphs; add them with `unidg export cache-graphs`, or run with "
            "--cache off"
        )
    missing = [name for name in CACHE_GRAPH_NAMES if name not in engines]
    if missing:
        return (
            f"bundle {bundle.path} has no TensorRT plans for the step-cache graphs {missing}: build them with "
            f"`unidg export engine --bundle {bundle.path}` (it builds every graph of a bundle with step-cache "
            "graphs), or use --backend onnxruntime, or --cache off"
        )
    if cuda_graph:
        return (
            "--cuda-graph captures the uncached loop only; drop it to run step caching with the tensorrt backend, or "
            "run with --cache off"
        )
    return None
