"""ModelOpt's part of ``unidg export quantize``: the quantize config, calibration of the transformer on a calibration
set's step inputs, and the checks and fixes of the calibrated ranges.

- FP8: E4M3 per-tensor weights and activations of every Linear, ``max`` calibration;
- INT8: SmoothQuant (alpha 0.8 by default), per-channel weights, per-tensor activations.

Both keep ``x_embedder``, ``context_embedder``, the time/guidance/pooled embedders (``time_text_embed``), ``norm_out``
and the final ``proj_out`` in high precision (NVIDIA's FLUX recipe), and never quantize attention (QK^T, softmax, PV
stay in the graph's float precision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from unidg.calib.build import CalibSet
from unidg.core.errors import UniDGError
from unidg.export.onnx_export import Progress, warnings_quiet
from unidg.export.step_model import StepModel
from unidg.runtime.bundle import STEP_INPUTS

FORMATS = ("fp8", "int8")
SMOOTHQUANT_ALPHA = 0.8
# Kept in high precision (quantizer names relative to the transformer; fnmatch from the start, so "proj_out.*" is
# the final projection only, not the single blocks' proj_out).
HIGH_PRECISION_MODULES = ("x_embedder.*", "context_embedder.*", "time_text_embed.*", "norm_out.*", "proj_out.*")
FP8_E4M3 = {"num_bits": (4, 3), "axis": None}
INT8_PER_TENSOR = {"num_bits": 8, "axis": None}
INT8_PER_CHANNEL = {"num_bits": 8, "axis": 0}
SMALLEST_AMAX = 1e-12


class QuantizationError(UniDGError):
    """Quantization cannot be done as asked (inputs, calibration set, reference bundle)."""


def quant_config(fmt: str, alpha: float = SMOOTHQUANT_ALPHA) -> dict:
    """The ModelOpt quantize config: deny all, then enable Linear weights/inputs, then keep the listed modules."""
    if fmt not in FORMATS:
        raise QuantizationError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    weights, inputs = (FP8_E4M3, FP8_E4M3) if fmt == "fp8" else (INT8_PER_CHANNEL, INT8_PER_TENSOR)
    entries: list[dict] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": dict(weights)},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "cfg": dict(inputs)},
    ]
    entries += [{"quantizer_name": pattern, "enable": False} for pattern in HIGH_PRECISION_MODULES]
    algorithm = "max" if fmt == "fp8" else {"method": "smoothquant", "alpha": float(alpha)}
    return {"quant_cfg": entries, "algorithm": algorithm}


def calibrate(model, calib: CalibSet, fmt: str, *, alpha: float, limit: int | None, progress: Progress | None):
    """Insert ModelOpt quantizers into the transformer and calibrate them on the calibration records."""
    import modelopt.torch.quantization as mtq

    step = StepModel(model).eval()
    records = list(calib.records(held_out=False))
    if limit:
        records = records[:limit]
    if not records:
        raise QuantizationError(f"--calib {calib.path} has no calibration records outside its held-out samples")

    def forward_loop(_transformer) -> None:
        with torch.no_grad():
            for record in records:
                step(*[torch.from_numpy(record[name]) for name in STEP_INPUTS])

    if progress:
        progress(f"calibrating {fmt} on {len(records)} step inputs")
    with warnings_quiet(), quiet_modelopt():
        mtq.quantize(model.transformer, quant_config(fmt, alpha), forward_loop=forward_loop)
    return quantizer_summary(model.transformer)


def quantizer_summary(transformer) -> dict:
    """Counts of enabled quantizers and the amax range (for the manifest and the broken-calibration check)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled, amaxes, tiny = 0, [], 0
    for _, module in transformer.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled:
            enabled += 1
            amax = getattr(module, "amax", None)
            if amax is not None:
                values = amax.detach().float().abs().reshape(-1)
                amaxes.append(values)
                tiny += int((values <= SMALLEST_AMAX).sum())
    flat = torch.cat(amaxes) if amaxes else torch.zeros(1)
    return {
        "enabled_quantizers": enabled,
        "amax_min": float(flat.min()),
        "amax_max": float(flat.max()),
        "zero_amax": tiny,
    }


def scale_amax(transformer, factor: float) -> None:
    """Multiply every calibrated range by ``factor`` (diagnostics: 0 gives the scales of an all-zero calibration,
    which the accuracy gate must reject)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    for _, module in transformer.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled and getattr(module, "amax", None) is not None:
            module.amax = module.amax * factor


def guard_amax(transformer) -> int:
    """Replace zero / non-finite amax by a tiny positive value (as ModelOpt's exporter does for zero scales), so a
    degenerate calibration still exports and the accuracy gate judges it; returns how many were replaced."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    replaced = 0
    for _, module in transformer.named_modules():
        if isinstance(module, TensorQuantizer) and module.is_enabled and getattr(module, "amax", None) is not None:
            amax = module.amax
            bad = ~torch.isfinite(amax) | (amax.abs() <= SMALLEST_AMAX)
            if bad.any():
                replaced += int(bad.sum())
                module.amax = torch.where(bad, torch.full_like(amax, SMALLEST_AMAX), amax)
    return replaced


@contextlib.contextmanager
def quiet_modelopt() -> Iterator[None]:
    """ModelOpt prints to stdout and logs progress; keep stdout for the command's own output."""
    import logging
    import sys

    import onnx_graphsurgeon as gs

    logger = logging.getLogger("modelopt")
    level, gs_severity = logger.level, gs.logger.G_LOGGER.severity
    logger.setLevel(logging.WARNING)
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)
        gs.logger.G_LOGGER.severity = gs_severity
