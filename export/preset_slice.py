"""Slices of a preset for checking the export's size, time and memory cheaply (``unidg export slice``): the preset's
model with only its first few transformer blocks materialised, random weights, and the export of its step graph."""

from __future__ import annotations

import math
import time
from dataclasses import replace as dataclass_replace
from pathlib import Path

import torch

from unidg.export.onnx_export import (
    ExportError,
    ExportOptions,
    GraphRecord,
    Progress,
    export_graph,
    parameter_bytes,
    print_progress,
)
from unidg.train.model import UniDGModel
from unidg.train.presets import get_preset


def preset_slice(
    preset: str = "full",
    *,
    double_blocks: int = 1,
    single_blocks: int = 1,
    heads: int | None = None,
    seed: int = 0,
) -> UniDGModel:
    """A preset's model built on the meta device (no memory), with only the first ``double_blocks`` double and
    ``single_blocks`` single blocks of its transformer materialised on the CPU with random weights.

    The other networks stay on the meta device: the step graph needs the transformer only. ``heads`` narrows the
    transformer (same head size, embedders and RoPE axes) to test the export mechanics cheaply.
    """
    spec = get_preset(preset)
    if heads is not None:
        spec = dataclass_replace(spec, transformer=dataclass_replace(spec.transformer, num_attention_heads=heads))
    if double_blocks < 0 or single_blocks < 0 or double_blocks + single_blocks < 1:
        raise ExportError("a slice needs at least one block (--double-blocks / --single-blocks)")
    model = UniDGModel.from_preset(spec, device="meta")
    transformer = model.transformer
    if double_blocks > len(transformer.transformer_blocks) or single_blocks > len(
        transformer.single_transformer_blocks
    ):
        raise ExportError(
            f"preset {preset!r} has {len(transformer.transformer_blocks)} double and "
            f"{len(transformer.single_transformer_blocks)} single blocks"
        )
    transformer.transformer_blocks = torch.nn.ModuleList(list(transformer.transformer_blocks)[:double_blocks])
    transformer.single_transformer_blocks = torch.nn.ModuleList(
        list(transformer.single_transformer_blocks)[:single_blocks]
    )
    transformer.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if parameter.ndim >= 2:
                fan_in = parameter.shape[1]
                parameter.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
            elif "norm" in name and name.endswith("weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model


def export_slice(
    out: str | Path,
    *,
    preset: str = "full",
    double_blocks: int = 1,
    single_blocks: int = 1,
    heads: int | None = None,
    resolution: int = 768,
    external_data: bool | None = None,
    progress: Progress | None = print_progress,
) -> GraphRecord:
    """Export the step graph of a preset slice (random weights) into ``out``; returns its manifest facts."""
    started = time.perf_counter()
    model = preset_slice(preset, double_blocks=double_blocks, single_blocks=single_blocks, heads=heads)
    options = ExportOptions(resolution=resolution)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress:
        size = parameter_bytes(model.transformer) / 2**30
        progress(
            f"{preset} slice: {double_blocks} double + {single_blocks} single blocks, {size:.2f} GiB of weights, "
            f"materialised in {time.perf_counter() - started:.1f} s"
        )
    return export_graph("step", model, out, options, progress=progress, external_data=external_data)
