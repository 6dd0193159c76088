"""``unidg export quantize``: an FP8 or INT8 bundle with NVIDIA ModelOpt, gated by an accuracy report.

1. Calibration (``modelopt.torch.quantization.quantize``) of the transformer on the step inputs of a calibration set
   built from the same weights (``unidg calib build``; its held-out samples are kept for the report):
   - FP8: E4M3 per-tensor weights and activations of every Linear, ``max`` calibration;
   - INT8: SmoothQuant (alpha 0.8 by default), per-channel weights, per-tensor activations.
   Both keep ``x_embedder``, ``context_embedder``, the time/guidance/pooled embedders (``time_text_embed``),
   ``norm_out`` and the final ``proj_out`` in high precision (NVIDIA's FLUX recipe), and never quantize attention
   (QK^T, softmax, PV stay in the graph's float precision).
2. Export: ModelOpt's quantizers export Q/DQ through the TorchScript ONNX exporter (their symbolic functions exist
   only there), at opset 20; ``aten::rms_norm``, which that exporter lacks, gets a symbolic for the export's duration.
   For FP8, attention stays one fused opset-23 ``Attention`` node (a symbolic for ``aten::scaled_dot_product_attention``
   with the key bias expanded to [B, 1, S_q, S_k], the form onnxruntime runs) and the graph's opset becomes 23; INT8
   keeps the exporter's MatMul/Softmax form at opset 20 (see ``FUSED_ATTENTION_FORMATS``).
3. Q/DQ for onnxruntime and TensorRT: FP8 weights are stored as FP8 (ModelOpt ``FP8QuantExporter.compress_weights``)
   and every ``trt``-domain FP8 Q/DQ is moved to the default ONNX domain (QuantizeLinear/DequantizeLinear with an
   E4M3 zero point, opset >= 19); onnxruntime runs it with its ``QDQPropagationTransformer`` disabled. INT8 weights
   keep float weights beside their Q/DQ pair (TensorRT folds them into int8 weights at build time).
4. Accuracy report on the held-out samples against the unquantized (fp32) bundle, both in onnxruntime: cosine
   similarity of the velocity at every captured step, and PSNR of the final decoded diptych after the full 28-step
   trajectory from the same noise. The gate (``--min-cosine``, ``--min-psnr``) fails the command and writes nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from unidg.calib.build import CalibSet, read_calib
from unidg.calib.folders import OutputFolderError, load_weights_model, read_weights, staged_folder
from unidg.export.bundle import TOOLS, write_bundle_manifest
from unidg.export.onnx_export import (
    EXTERNAL_DATA_THRESHOLD,
    Progress,
    check_onnx,
    io_table,
    print_progress,
    warnings_quiet,
)
from unidg.export.parity import compare, cosine, onnx_session, psnr
from unidg.export.step_model import STEP_INPUTS, STEP_OUTPUTS, StepModel, float32_rope
from unidg.runtime.bundle import GRAPH_NAMES, Bundle, load_bundle
from unidg.runtime.errors import UniDGError
from unidg.runtime.manifest import read_manifest, tool_versions

FORMATS = ("fp8", "int8")
QDQ_OPSET = 20  # the TorchScript exporter's newest opset; >= 19 has FP8 QuantizeLinear
FUSED_ATTENTION_OPSET = 23  # the fused Attention node's opset; the Q/DQ graph is raised to it after export
# INT8 stays at opset 20 with decomposed attention: at opset >= 21 onnxruntime's CPU graph optimiser rewrites the INT8
# Q/DQ Gemm inputs into a QuantizeLinear whose output_dtype (INT8) contradicts its zero point (UINT8) and the session
# fails to load (onnxruntime 1.31, measured), so the runtime could not run an INT8 bundle on CPU.
FUSED_ATTENTION_FORMATS = ("fp8",)
SMOOTHQUANT_ALPHA = 0.8
DEFAULT_MIN_COSINE = 0.995
DEFAULT_MIN_PSNR = 30.0
# Kept in high precision (quantizer names relative to the transformer; fnmatch from the start, so "proj_out.*" is
# the final projection only, not the single blocks' proj_out).
HIGH_PRECISION_MODULES = ("x_embedder.*", "context_embedder.*", "time_text_embed.*", "norm_out.*", "proj_out.*")
FP8_E4M3 = {"num_bits": (4, 3), "axis": None}
INT8_PER_TENSOR = {"num_bits": 8, "axis": None}
INT8_PER_CHANNEL = {"num_bits": 8, "axis": 0}
SMALLEST_AMAX = 1e-12


class QuantizationError(UniDGError):
    """Quantization cannot be done as asked (inputs, calibration set, reference bundle)."""


class AccuracyGateError(QuantizationError):
    """The quantized bundle is less accurate than the gate allows; nothing was written."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


# ------------------------------------------------------------------------------------------------ ModelOpt config
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
    with warnings_quiet(), _quiet_modelopt():
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


# ------------------------------------------------------------------------------------------------ export
def _rms_norm_symbolic(g, input, normalized_shape, weight, eps):  # noqa: A002 - aten's argument names
    """aten::rms_norm for the TorchScript exporter: x / sqrt(mean(x^2, -1) + eps) * weight."""
    from torch.onnx import symbolic_helper

    dims = symbolic_helper._maybe_get_const(normalized_shape, "is")
    if not isinstance(dims, list | tuple) or len(dims) != 1:
        raise QuantizationError(f"rms_norm over {dims!r}: only normalisation over the last axis is exported")
    epsilon = symbolic_helper._maybe_get_const(eps, "f")
    epsilon = 1e-6 if epsilon is None or symbolic_helper._is_value(epsilon) else float(epsilon)
    square = g.op("Mul", input, input)
    mean = g.op("ReduceMean", square, g.op("Constant", value_t=torch.tensor([-1], dtype=torch.int64)), keepdims_i=1)
    denominator = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(epsilon))))
    normalized = g.op("Div", input, denominator)
    return normalized if symbolic_helper._is_none(weight) else g.op("Mul", normalized, weight)


@contextlib.contextmanager
def rms_norm_symbolic(opset: int) -> Iterator[None]:
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::rms_norm", opset)


def _fused_attention_symbolic(
    g, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """aten::scaled_dot_product_attention as one opset-23 ``Attention`` node (the TorchScript exporter would write
    MatMul -> Add -> Softmax -> MatMul, which a strongly typed TensorRT build runs unfused, materialising the score
    tensor). The mask is expanded to [B, 1, S_q, S_k]: onnxruntime's kernel refuses a key-only mask, and a TensorRT
    build traces the Expand back to the key-only form (``onnx_rewrite.rewrite_attention_to_key_mask``)."""
    from torch.onnx import symbolic_helper

    flags = {
        "dropout_p": symbolic_helper._maybe_get_const(dropout_p, "f"),
        "is_causal": symbolic_helper._maybe_get_const(is_causal, "b"),
        "enable_gqa": symbolic_helper._maybe_get_const(enable_gqa, "b"),
    }
    if any(not isinstance(value, bool | int | float) or value for value in flags.values()):
        raise QuantizationError(f"scaled_dot_product_attention with {flags}: only plain (non-causal) attention exports")
    attributes = {}
    if not symbolic_helper._is_none(scale):
        attributes["scale_f"] = float(symbolic_helper._maybe_get_const(scale, "f"))
    inputs = [query, key, value]
    if not symbolic_helper._is_none(attn_mask):

        def dims(tensor, indices: list[int]):
            positions = g.op("Constant", value_t=torch.tensor(indices, dtype=torch.int64))
            return g.op("Gather", g.op("Shape", tensor), positions, axis_i=0)

        target = g.op("Concat", dims(attn_mask, [0, 1]), dims(query, [2]), dims(key, [2]), axis_i=0)
        inputs.append(g.op("Expand", attn_mask, target))
    out = g.op("Attention", *inputs, **attributes)
    out.setType(query.type())
    return out


@contextlib.contextmanager
def fused_attention_symbolic(opset: int) -> Iterator[None]:
    torch.onnx.register_custom_op_symbolic("aten::scaled_dot_product_attention", _fused_attention_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::scaled_dot_product_attention", opset)


@contextlib.contextmanager
def plain_attention_for_export(transformer) -> Iterator[None]:
    """Let the attention modules call torch's own SDPA during the export, so the fused symbolic applies.

    ModelOpt's diffusers plugin swaps ``F.scaled_dot_product_attention`` inside every quantized FluxAttention for
    its FP8SDPA function, whose ONNX symbolic writes MatMul/Softmax/MatMul even when the attention quantizers are
    off. They always are here (``quant_config`` enables Linear quantizers only; checked below), so dropping that swap
    for the export changes no value, only the graph form.
    """
    enabled = [
        name
        for name, module in transformer.named_modules()
        for part in ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")
        if getattr(getattr(module, part, None), "is_enabled", False)
    ]
    if enabled:
        raise QuantizationError(
            f"attention quantizers are enabled in {sorted(set(enabled))}; attention must stay 16-bit"
        )
    try:
        from modelopt.torch.quantization.plugins.diffusion import diffusers as plugin
    except ImportError:  # no diffusers plugin: SDPA is not swapped
        yield
        return
    saved = plugin._QuantAttention._functionals_to_replace
    plugin._QuantAttention._functionals_to_replace = [
        entry for entry in saved if entry[1] != "scaled_dot_product_attention"
    ]
    try:
        yield
    finally:
        plugin._QuantAttention._functionals_to_replace = saved


def export_qdq_step(
    model, path: Path, example: dict[str, np.ndarray], dynamic_batch: bool, fused_attention: bool = True
) -> None:
    """TorchScript export of the quantized step model (ModelOpt's Q/DQ symbolics) at opset 20; with
    ``fused_attention`` every attention is one ``Attention`` node (the graph is raised to opset 23 afterwards)."""
    step = StepModel(model).eval()
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in example.values())
    axes = None
    if dynamic_batch:
        axes = {name: {0: "batch"} for name in ("x", "cond", "ctx", "key_bias", "sigma", "sigma_next", "guidance")}
        axes["x_next"] = {0: "batch"}
    with (
        torch.no_grad(),
        float32_rope(model),
        rms_norm_symbolic(QDQ_OPSET),
        fused_attention_symbolic(QDQ_OPSET) if fused_attention else contextlib.nullcontext(),
        plain_attention_for_export(model.transformer) if fused_attention else contextlib.nullcontext(),
        warnings_quiet(),
    ):
        torch.onnx.export(
            step,
            args,
            str(path),
            dynamo=False,
            opset_version=QDQ_OPSET,
            input_names=list(STEP_INPUTS),
            output_names=list(STEP_OUTPUTS),
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def _move_fp8_qdq_to_default_domain(model: onnx.ModelProto) -> int:
    """trt::TRT_FP8{Quantize,Dequantize}Linear -> default-domain Q/DQ with an E4M3 zero point (opset >= 19)."""
    moved = 0
    added = []
    for node in model.graph.node:
        if node.domain != "trt" or node.op_type not in (
            "TRT_FP8QuantizeLinear",
            "TRT_FP8DequantizeLinear",
            "QuantizeLinear",
            "DequantizeLinear",
        ):
            continue
        quantize = "Quantize" in node.op_type and "Dequantize" not in node.op_type
        node.domain = ""
        node.op_type = "QuantizeLinear" if quantize else "DequantizeLinear"
        if quantize:
            if len(node.input) == 2:
                zero_point = f"{node.output[0]}_zero_point"
                added.append(onnx.helper.make_tensor(zero_point, onnx.TensorProto.FLOAT8E4M3FN, [], [0.0]))
                node.input.append(zero_point)
            if not any(a.name == "saturate" for a in node.attribute):
                node.attribute.append(onnx.helper.make_attribute("saturate", 1))
        moved += 1
    model.graph.initializer.extend(added)
    quantized = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for value in model.graph.value_info:
        if value.name in quantized:
            value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT8E4M3FN
    imports = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(imports)
    return moved


def finish_qdq_graph(path: Path, fmt: str, progress: Progress | None) -> dict:
    """Store quantized weights in their 8-bit type, make the Q/DQ standard ONNX and raise the opset to the fused
    Attention node's; returns node counts."""
    model = onnx.load(str(path))
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and any(node.op_type == "Attention" for node in model.graph.node):
            opset.version = max(opset.version, FUSED_ATTENTION_OPSET)
    with warnings_quiet(), _quiet_modelopt():
        if fmt == "fp8":
            from modelopt.onnx.export import FP8QuantExporter

            model = FP8QuantExporter.compress_weights(model)
            moved = _move_fp8_qdq_to_default_domain(model)
        else:
            # INT8 Q/DQ are standard ONNX already; weights stay float beside their Q/DQ pair (ModelOpt's
            # INT8QuantExporter does not compress, and its qdq_to_dq refuses the exporter's transposed weights).
            moved = 0
    if any(o.domain == "" and o.version < 19 for o in model.opset_import):
        raise QuantizationError("the Q/DQ graph needs opset >= 19 for FP8 QuantizeLinear")
    model.ir_version = min(model.ir_version, 10)
    external = model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    path.unlink()
    if external:
        onnx.save(
            model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data"
        )
    else:
        onnx.save(model, str(path))
    check_onnx(path)
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if not node.domain else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    if progress:
        progress(
            f"step: {counts.get('QuantizeLinear', 0)} QuantizeLinear, {counts.get('DequantizeLinear', 0)} "
            f"DequantizeLinear ({moved} moved from the trt domain)"
        )
    return dict(sorted(counts.items()))


def precision_census(model: onnx.ModelProto) -> dict:
    """Where a step graph keeps float32: initializers by type; MatMul/Gemm that take a dequantized (FP8/INT8) operand
    and those that run in float32 without one; attention as fused nodes (opset-23 ``Attention`` or the plugin node)
    or decomposed (its ``Softmax``). A strongly typed TensorRT build runs every float32 tensor in float32, so these
    counts say how much of the graph FP8/INT8 actually covers."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        value.name: value.type.tensor_type.elem_type
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    }
    producer = {output: node for node in inferred.graph.node for output in node.output}

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        if node is not None and node.op_type == "Transpose":
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    initializers: dict[str, int] = {}
    for tensor in inferred.graph.initializer:
        name = onnx.TensorProto.DataType.Name(tensor.data_type)
        initializers[name] = initializers.get(name, 0) + 1
    matmuls = [node for node in inferred.graph.node if node.op_type in ("MatMul", "Gemm")]
    quantized = [node for node in matmuls if any(dequantized(i) for i in node.input)]
    float32 = [
        node for node in matmuls if node not in quantized and types.get(node.output[0]) == onnx.TensorProto.FLOAT
    ]
    ops = [node.op_type for node in inferred.graph.node]
    return {
        "initializers": dict(sorted(initializers.items())),
        "fp32_initializers": initializers.get("FLOAT", 0),
        "matmul_gemm": len(matmuls),
        "quantized_matmul_gemm": len(quantized),
        "fp32_matmul_gemm": len(float32),
        "fused_attention": ops.count("Attention") + ops.count("biased_attention"),
        "softmax": ops.count("Softmax"),
    }


@contextlib.contextmanager
def _quiet_modelopt() -> Iterator[None]:
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


# ------------------------------------------------------------------------------------------------ accuracy
@dataclass(frozen=True)
class AccuracyReport:
    format: str
    samples: int
    records: int
    velocity_cosine_mean: float
    velocity_cosine_min: float
    latents_max_abs: float
    psnr_mean: float
    psnr_min: float
    min_cosine: float
    min_psnr: float

    @property
    def passed(self) -> bool:
        return self.velocity_cosine_mean >= self.min_cosine and self.psnr_min >= self.min_psnr

    def to_dict(self) -> dict:
        data = asdict(self)
        data["passed"] = self.passed
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in data.items()}

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{self.format} accuracy on {self.samples} held-out samples ({self.records} step inputs): velocity cosine "
            f"mean {self.velocity_cosine_mean:.4f} (min {self.velocity_cosine_min:.4f}, gate >= {self.min_cosine}); "
            f"final diptych PSNR mean {self.psnr_mean:.2f} dB (min {self.psnr_min:.2f} dB, gate >= {self.min_psnr}); "
            f"{verdict}"
        )


def accuracy_report(
    quantized_step: Path,
    reference: Bundle,
    calib: CalibSet,
    fmt: str,
    *,
    min_cosine: float,
    min_psnr: float,
    samples: int | None = None,
) -> AccuracyReport:
    """Quantized vs unquantized step graph (onnxruntime) on the calibration set's held-out samples."""
    from unidg.runtime.latents import model_to_pixels
    from unidg.train.model import unpack_latents

    quantized = onnx_session(quantized_step, fmt)
    unquantized = onnx_session(reference.graph_path("step"), reference.precision)
    decoder = onnx_session(reference.graph_path("vae_decoder"), reference.precision)
    batch = reference.batch or 1

    def run(session, feeds: dict[str, np.ndarray]) -> np.ndarray:
        tiled = {k: (np.repeat(v, batch, 0) if k not in ("img_ids", "txt_ids") else v) for k, v in feeds.items()}
        return session.run(None, tiled)[0][:1]

    cosines = []
    for record in calib.records(held_out=True):
        step = float(record["sigma_next"][0] - record["sigma"][0])
        v_quant = (run(quantized, record) - record["x"]) / step
        v_full = (run(unquantized, record) - record["x"]) / step
        cosines.append(cosine(v_quant, v_full))
    sigmas = None
    psnrs, latent_errors, count = [], [], 0
    h, w = reference.latent_hw
    for sample in calib.samples(held_out=True):
        if samples is not None and count >= samples:
            break
        if sigmas is None:
            from unidg.runtime.sampler import sampling_sigmas

            sigmas = sampling_sigmas(int(calib.metadata["steps"]), sample["noise"].shape[1])
        finals = []
        for session in (quantized, unquantized):
            x = sample["noise"]
            for i in range(len(sigmas) - 1):
                feeds = {
                    "x": x,
                    "cond": sample["cond"],
                    "ctx": sample["ctx"],
                    "key_bias": sample["key_bias"],
                    "sigma": np.array([sigmas[i]], np.float32),
                    "sigma_next": np.array([sigmas[i + 1]], np.float32),
                    "guidance": sample["guidance"],
                    "img_ids": sample["img_ids"],
                    "txt_ids": sample["txt_ids"],
                }
                x = run(session, feeds)
            finals.append(x)
        latent_errors.append(compare(finals[0], finals[1]).max_abs)
        images = []
        for x in finals:
            latents = unpack_latents(torch.from_numpy(x), h // 2, w // 2).numpy()
            images.append(model_to_pixels(run(decoder, {"latents": latents}))[0])
        psnrs.append(psnr(images[0], images[1]))
        count += 1
    if not cosines or not psnrs:
        raise QuantizationError(f"--calib {calib.path} has no held-out samples to measure accuracy on")
    finite = [p for p in psnrs if math.isfinite(p)]
    return AccuracyReport(
        format=fmt,
        samples=count,
        records=len(cosines),
        velocity_cosine_mean=float(np.mean(cosines)),
        velocity_cosine_min=float(np.min(cosines)),
        latents_max_abs=float(max(latent_errors)),
        psnr_mean=float(np.mean(finite)) if finite else math.inf,
        psnr_min=float(min(psnrs)),
        min_cosine=min_cosine,
        min_psnr=min_psnr,
    )


# ------------------------------------------------------------------------------------------------ command
def _reference_bundle(reference: str | Path, weights_fingerprint: str, resolution: int) -> Bundle:
    bundle = load_bundle(reference)
    if bundle.metadata.get("weights", {}).get("fingerprint") != weights_fingerprint:
        raise QuantizationError(
            f"--reference {reference} was exported from other weights; export it from --weights with "
            "`unidg export onnx`, or leave --reference out"
        )
    if bundle.precision in FORMATS:
        raise QuantizationError(f"--reference {reference} is itself {bundle.precision}; it must be unquantized")
    if bundle.resolution != resolution:
        raise QuantizationError(
            f"--reference {reference} is a static S={bundle.resolution} bundle but the calibration set is at "
            f"S={resolution}; export the reference at --resolution {resolution}"
        )
    return bundle


def quantize_bundle(
    weights: str | Path,
    calib: str | Path,
    fmt: str,
    out: str | Path,
    *,
    reference: str | Path | None = None,
    alpha: float = SMOOTHQUANT_ALPHA,
    min_cosine: float = DEFAULT_MIN_COSINE,
    min_psnr: float = DEFAULT_MIN_PSNR,
    calib_limit: int | None = None,
    report_samples: int | None = None,
    amax_scale: float = 1.0,
    overwrite: bool = False,
    progress: Progress | None = print_progress,
) -> dict:
    """``unidg export quantize``: returns the accuracy report (dict); raises AccuracyGateError below the gate."""
    if fmt not in FORMATS:
        raise QuantizationError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    if Path(out).exists() and not overwrite:
        raise OutputFolderError(f"{out} already exists; choose another --out or pass --overwrite")
    info = read_weights(weights, progress=progress)
    calib_set = read_calib(calib, weights_fingerprint=info.fingerprint)
    resolution = calib_set.resolution
    settings = replace(info.settings, resolution=resolution)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix=".unidg-quantize.", dir=Path(out).absolute().parent))
    try:
        if reference is None:
            if progress:
                progress(f"exporting the unquantized fp32 reference graphs at S={resolution}")
            reference_dir = workdir / "reference"
            from unidg.export.bundle import export_bundle

            export_bundle(weights, reference_dir, resolution=resolution, verify_weights=False, progress=progress)
            reference = reference_dir
        reference_bundle = _reference_bundle(reference, info.fingerprint, resolution)

        model = load_weights_model(info, settings)
        summary = calibrate(model, calib_set, fmt, alpha=alpha, limit=calib_limit, progress=progress)
        if amax_scale != 1.0:
            scale_amax(model.transformer, amax_scale)
            summary["amax_scale"] = amax_scale
        summary["amax_replaced"] = guard_amax(model.transformer)
        step_path = workdir / "step.onnx"
        example = next(calib_set.records(held_out=False))
        batch = reference_bundle.batch or 1
        example = {k: (np.repeat(v, batch, 0) if k not in ("img_ids", "txt_ids") else v) for k, v in example.items()}
        if progress:
            progress(f"exporting the {fmt} Q/DQ step graph (TorchScript exporter, opset {QDQ_OPSET})")
        fused = fmt in FUSED_ATTENTION_FORMATS
        export_qdq_step(model, step_path, example, dynamic_batch=reference_bundle.batch is None, fused_attention=fused)
        op_counts = finish_qdq_graph(step_path, fmt, progress)

        if progress:
            progress("measuring accuracy on the held-out samples against the unquantized bundle")
        report = accuracy_report(
            step_path,
            reference_bundle,
            calib_set,
            fmt,
            min_cosine=min_cosine,
            min_psnr=min_psnr,
            samples=report_samples,
        )
        if progress:
            progress(str(report))
        report_data = {**report.to_dict(), "calibration": summary}
        if not report.passed:
            raise AccuracyGateError(
                f"the {fmt} bundle fails the accuracy gate, nothing was written to {out}: {report}. Rebuild the "
                "calibration set (more samples, the right weights) or lower --min-cosine/--min-psnr deliberately",
                report_data,
            )
        with staged_folder(out, overwrite=overwrite) as staging:
            records = _copy_reference_graphs(reference_bundle, staging)
            step_model = onnx.load(str(step_path), load_external_data=False)
            for file in step_path.parent.glob("step.onnx*"):
                shutil.copy2(file, staging / file.name)
            records["step"] = {
                "file": "step.onnx",
                "inputs": io_table(step_model.graph.input),
                "outputs": io_table(step_model.graph.output),
                "external_data": ["step.onnx.data"] if (staging / "step.onnx.data").exists() else [],
                "op_counts": op_counts,
            }
            (staging / "accuracy.json").write_text(json.dumps(report_data, indent=2) + "\n")
            metadata = copy.deepcopy(reference_bundle.metadata)
            metadata.update(
                {
                    "settings": settings.to_dict(),
                    "precision": fmt,
                    "attention": "portable",
                    "attention_form": "expand" if fused else "decomposed",
                    "opset": max(o.version for o in step_model.opset_import if o.domain in ("", "ai.onnx")),
                    "graphs": {name: records[name] for name in GRAPH_NAMES},
                    "engines": {},
                    "quantization": {
                        "tool": "nvidia-modelopt",
                        "format": fmt,
                        "algorithm": "max" if fmt == "fp8" else {"method": "smoothquant", "alpha": alpha},
                        "high_precision_modules": list(HIGH_PRECISION_MODULES),
                        "attention": "not quantized" + (" (fused Attention node)" if fused else ""),
                        "calib": {
                            "path": calib_set.path.name,
                            "fingerprint": calib_set.manifest.fingerprint,
                            "records": summary,
                        },
                        "reference_fingerprint": reference_bundle.fingerprint,
                        "accuracy": report.to_dict(),
                        "seconds": round(time.perf_counter() - started, 1),
                    },
                    "tools": tool_versions(*TOOLS),
                }
            )
            write_bundle_manifest(staging, metadata)
        if progress:
            progress(f"{fmt} bundle written to {out}")
        return report_data
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _copy_reference_graphs(reference: Bundle, staging: Path) -> dict[str, dict]:
    """The VAE and image-encoder graphs of the reference bundle, copied unchanged (with their manifest entries)."""
    manifest = read_manifest(reference.path, kind="bundle")
    graphs = manifest.metadata["graphs"]
    copied = {}
    for name in GRAPH_NAMES:
        if name == "step":
            continue
        entry = graphs[name]
        for file in [entry["file"], *entry.get("external_data", [])]:
            shutil.copy2(reference.path / file, staging / file)
        copied[name] = entry
    return copied
