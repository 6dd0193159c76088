"""``unidg export cache-graphs``: add the step-cache graphs (head, tail, cached step) to a bundle, as a new bundle.

The three graphs are the step graph cut after its first block (unidg.runtime.step_cache, unidg.train.split_transformer):
``step_head`` runs every step, ``step_tail`` on full steps, ``step_cached`` on cached ones. They are plain graphs, no
``If``: onnxruntime and TensorRT both run them as they run the step graph, a TensorRT engine per graph stays static
(a data-dependent ``If`` would keep an engine from being captured in a CUDA graph), and the cache decision stays on
the host where a static schedule needs none. The bundle's own ``step.onnx`` is copied unchanged, so ``--cache off``
runs exactly what it ran before. The new bundle is format_version 2 (a runtime that reads only 1 refuses it by name);
caching stays off by default until ``unidg export cache-calibrate`` records a setting that passed its gate.

A bundle that carries torch programs (``unidg export onnx --torch-programs``) gets the three graphs as torch programs
too (``torch/step_head.pt2`` ...), from the same modules and example inputs, so ``--backend torch`` runs the cache.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from unidg.core.manifest import Manifest
from unidg.core.weights_folder import OutputFolderError, read_weights, staged_folder
from unidg.export.bundle import write_bundle_manifest
from unidg.export.lowered_flux import LoweredFlux
from unidg.export.onnx_export import (
    BATCH_AXIS,
    ExportError,
    ExportOptions,
    GraphRecord,
    ModelFacts,
    Progress,
    _rewrite_to_plugin,
    cast_for_precision,
    export_module,
    lowered_transformer,
    parameter_bytes,
    print_progress,
    step_example_inputs,
    torch_program_file,
    warnings_quiet,
)
from unidg.export.step_model import StepCachedModel, StepHeadModel, StepTailModel, float32_rope
from unidg.runtime.bundle import (
    BUNDLE_FORMAT_VERSION_STEP_CACHE,
    CACHE_GRAPH_NAMES,
    CACHE_GRAPH_OUTPUTS,
    Bundle,
    cache_graph_inputs,
    load_bundle,
)
from unidg.runtime.step_cache import SIGNAL
from unidg.train.loading import load_weights_model
from unidg.train.model import UniDGModel

CACHE_MODULES = {"step_head": StepHeadModel, "step_tail": StepTailModel, "step_cached": StepCachedModel}
TOKEN_AXIS_TENSORS = ("x", "cond", "hidden", "first_residual", "tail_residual")


def hidden_dim(model: UniDGModel) -> int:
    config = model.transformer.config
    return int(config.num_attention_heads * config.attention_head_dim)


def cache_example_inputs(model: UniDGModel, facts: ModelFacts, batch: int, seed: int = 0) -> dict[str, dict]:
    """Example inputs of the three graphs: the step's example inputs, the head's real outputs for the others."""
    inputs = cache_graph_inputs(facts.pooled_dim is not None)
    step = step_example_inputs(facts, batch, seed)
    head_inputs = {name: step[name] for name in inputs["step_head"]}
    with torch.no_grad(), float32_rope(model):
        outputs = StepHeadModel(model)(*(torch.from_numpy(v) for v in head_inputs.values()))
    head = dict(zip(CACHE_GRAPH_OUTPUTS["step_head"], (t.numpy() for t in outputs)))
    rng = np.random.default_rng(seed + 1)
    arrays = {**step, **head, "tail_residual": rng.standard_normal(head["hidden"].shape, dtype=np.float32)}
    return {name: {t: arrays[t] for t in inputs[name]} for name in CACHE_GRAPH_NAMES}


def _cache_dynamic_shapes(name: str, facts: ModelFacts, options: ExportOptions) -> dict | None:
    if not options.dynamic_batch and not options.dynamic_sequence:
        return None
    dim = torch.export.Dim
    batch = dim(BATCH_AXIS, min=1, max=options.max_batch) if options.dynamic_batch else None
    tokens = dim("image_tokens", min=2, max=2**16) if options.dynamic_sequence else None
    spec = {}
    for tensor in cache_graph_inputs(facts.pooled_dim is not None)[name]:
        axes: dict[int, object] = {}
        if tensor == "img_ids":
            axes = {0: tokens} if tokens is not None else {}
        elif tensor != "txt_ids":
            if batch is not None:
                axes[0] = batch
            if tokens is not None and tensor in TOKEN_AXIS_TENSORS:
                axes[1] = tokens
            if tokens is not None and tensor == "key_bias":
                axes[1] = tokens + facts.context_tokens
        spec[tensor] = axes
    return spec


def export_cache_graphs(
    model: UniDGModel,
    folder: Path,
    options: ExportOptions,
    progress: Progress | None = print_progress,
    text: bool = False,
) -> dict[str, GraphRecord]:
    """Export ``step_head``, ``step_tail`` and ``step_cached`` of ``model`` (cast already) into ``folder``; ``text``:
    a UniDG-Text bundle's, whose head takes ``pooled``."""
    facts = ModelFacts.of(model, options.resolution, text)
    inputs = cache_graph_inputs(text)
    examples = cache_example_inputs(model, facts, options.example_batch)
    records = {}
    for name in CACHE_GRAPH_NAMES:
        record = export_module(
            CACHE_MODULES[name](model, cache_lowered(model, options, name)).eval(),
            examples[name],
            Path(folder) / f"{name}.onnx",
            CACHE_GRAPH_OUTPUTS[name],
            dynamic_shapes=_cache_dynamic_shapes(name, facts, options),
            opset=options.opset,
            weight_bytes=parameter_bytes(model.transformer),
            progress=progress,
        )
        if tuple(record.inputs) != inputs[name] or tuple(record.outputs) != CACHE_GRAPH_OUTPUTS[name]:
            raise ExportError(
                f"{name}.onnx has inputs {list(record.inputs)} / outputs {list(record.outputs)}; the step cache needs "
                f"{list(inputs[name])} / {list(CACHE_GRAPH_OUTPUTS[name])}"
            )
        if name != "step_cached" and options.attention == "plugin":
            record = _rewrite_to_plugin(Path(folder) / record.file, record, progress)
        records[name] = record
    return records


def cache_lowered(model: UniDGModel, options: ExportOptions, name: str, program: bool = False) -> LoweredFlux | None:
    """The step graph's lowered transformer cut after its first block: blocks 0-1 for the head, the rest for the
    tail; None for the cached step (the output stage only)."""
    blocks = len(model.transformer.transformer_blocks) + len(model.transformer.single_transformer_blocks)
    ranges = {"step_head": (0, 1), "step_tail": (1, blocks)}
    return lowered_transformer(model, options, ranges[name], program) if name in ranges else None


def export_cache_programs(
    model: UniDGModel,
    folder: Path,
    options: ExportOptions,
    progress: Progress | None = print_progress,
    text: bool = False,
) -> dict[str, str]:
    """Save ``step_head``, ``step_tail`` and ``step_cached`` as ``torch.export`` programs for the torch backend;
    returns graph -> file (relative to ``folder``). The modules and example inputs the ONNX graphs are exported from,
    in the step program's form (key-only mask, elementwise RoPE)."""
    facts = ModelFacts.of(model, options.resolution, text)
    examples = cache_example_inputs(model, facts, options.example_batch)
    files = {}
    for name in CACHE_GRAPH_NAMES:
        args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in examples[name].values())
        spec = _cache_dynamic_shapes(name, facts, options)
        with torch.no_grad(), warnings_quiet():
            program = torch.export.export(
                CACHE_MODULES[name](model, cache_lowered(model, options, name, program=True)).eval(),
                args,
                dynamic_shapes=tuple(spec[t] for t in examples[name]) if spec else None,
            )
        files[name] = torch_program_file(name)
        path = Path(folder) / files[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
        if progress:
            progress(f"{name}: torch program {path.name}")
    return files


def bundle_export_options(bundle: Bundle) -> ExportOptions:
    """The export options a bundle was written with (from its manifest)."""
    meta = bundle.metadata
    if bundle.precision not in ("fp32", "fp16", "bf16"):
        raise ExportError(
            f"bundle {bundle.path} is {bundle.precision}: step-cache graphs are exported for fp32/fp16/bf16 bundles; "
            "add them to the unquantized bundle"
        )
    return ExportOptions(
        resolution=bundle.resolution,
        precision=bundle.precision,
        batch="dynamic" if bundle.batch is None else bundle.batch,
        dynamic_sequence=meta.get("sequence") == "dynamic",
        attention=str(meta.get("attention", "portable")),
        portable_mask=str(meta.get("attention_form", "expand")) if meta.get("attention") != "plugin" else "expand",
        opset=int(meta.get("opset", 23)),
        max_batch=int(meta.get("max_batch", 16)),
        rope=str(meta.get("rope", "op")),
    )


def add_cache_graphs(
    bundle_path: str | Path,
    weights_folder: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = print_progress,
) -> Manifest:
    """``unidg export cache-graphs``: a copy of the bundle plus the step-cache graphs, written atomically to ``out``."""
    bundle = load_bundle(bundle_path)
    if bundle.cache_graphs:
        raise OutputFolderError(f"bundle {bundle.path} already has step-cache graphs; nothing to add")
    weights = read_weights(weights_folder, progress=progress)
    wanted = (bundle.metadata.get("weights") or {}).get("fingerprint")
    if wanted and wanted != weights.fingerprint:
        raise OutputFolderError(
            f"--weights {weights.path} (fingerprint {weights.fingerprint[:12]}) is not the weights bundle "
            f"{bundle.path} was exported from ({wanted[:12]}); pass that weights folder"
        )
    options = bundle_export_options(bundle)
    model = cast_for_precision(load_weights_model(weights, bundle.settings), options.precision)
    with staged_folder(out, overwrite=overwrite) as staging:
        for relative in bundle.files:
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.file_path(relative), target)
        text = bool(bundle.text)
        records = export_cache_graphs(model, staging, options, progress, text)
        metadata = dict(bundle.metadata)
        if isinstance(metadata.get("torch_programs"), dict):  # the torch backend runs this bundle: cache it there too
            programs = export_cache_programs(model, staging, options, progress, text)
            metadata["torch_programs"] = {**metadata["torch_programs"], **programs}
        if not text:  # a UniDG-Text bundle stays format 3, which may carry the step cache
            metadata["format_version"] = BUNDLE_FORMAT_VERSION_STEP_CACHE
        metadata["step_cache"] = {
            "signal": SIGNAL,
            "hidden_dim": hidden_dim(model),
            "graphs": {name: record.manifest_entry() for name, record in records.items()},
            "gate": None,  # off by default until `unidg export cache-calibrate` records a passing setting
        }
        manifest = write_bundle_manifest(staging, metadata)
    if progress:
        progress(f"bundle with step-cache graphs written to {out}")
    return manifest
