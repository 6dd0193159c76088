"""The Q/DQ step graph of ``unidg export quantize``: export of the calibrated step model and the fix-ups that make its
Q/DQ run in onnxruntime and TensorRT.

1. Export: ModelOpt's quantizers export Q/DQ through the TorchScript ONNX exporter (their symbolic functions exist
   only there), at opset 20; ``aten::rms_norm``, which that exporter lacks, gets a symbolic for the export's duration.
   For FP8, attention stays one fused opset-23 ``Attention`` node (a symbolic for ``aten::scaled_dot_product_attention``
   with the key bias expanded to [B, 1, S_q, S_k], the form onnxruntime runs) and the graph's opset becomes 23; INT8
   keeps the exporter's MatMul/Softmax form at opset 20 (see ``FUSED_ATTENTION_FORMATS``).
2. Fix-ups: FP8 weights are stored as FP8 (ModelOpt ``FP8QuantExporter.compress_weights``) and every ``trt``-domain
   FP8 Q/DQ is moved to the default ONNX domain (QuantizeLinear/DequantizeLinear with an E4M3 zero point, opset >= 19);
   onnxruntime runs it with its ``QDQPropagationTransformer`` disabled. INT8 weights keep float weights beside their
   Q/DQ pair (TensorRT folds them into int8 weights at build time).
3. ``precision_census``: where the graph still runs in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch

from unidg.export.onnx_export import EXTERNAL_DATA_THRESHOLD, Progress, check_onnx, warnings_quiet
from unidg.export.quantize_modelopt import QuantizationError, quiet_modelopt
from unidg.export.step_model import StepModel, float32_rope
from unidg.runtime.bundle import STEP_INPUTS, STEP_OUTPUTS, STEP_POSITION_INPUTS

QDQ_OPSET = 20  # the TorchScript exporter's newest opset; >= 19 has FP8 QuantizeLinear
FUSED_ATTENTION_OPSET = 23  # the fused Attention node's opset; the Q/DQ graph is raised to it after export
# INT8 stays at opset 20 with decomposed attention: at opset >= 21 onnxruntime's CPU graph optimiser rewrites the INT8
# Q/DQ Gemm inputs into a QuantizeLinear whose output_dtype (INT8) contradicts its zero point (UINT8) and the session
# fails to load (onnxruntime 1.31, measured), so the runtime could not run an INT8 bundle on CPU.
FUSED_ATTENTION_FORMATS = ("fp8",)


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
def _custom_symbolic(op: str, symbolic: Callable, opset: int) -> Iterator[None]:
    """``symbolic`` exports ``op`` at ``opset`` for the duration of the block (the TorchScript exporter's registry)."""
    torch.onnx.register_custom_op_symbolic(op, symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(op, opset)


def rms_norm_symbolic(opset: int) -> contextlib.AbstractContextManager[None]:
    return _custom_symbolic("aten::rms_norm", _rms_norm_symbolic, opset)


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


def fused_attention_symbolic(opset: int) -> contextlib.AbstractContextManager[None]:
    return _custom_symbolic("aten::scaled_dot_product_attention", _fused_attention_symbolic, opset)


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
        batched = [name for name in STEP_INPUTS + STEP_OUTPUTS if name not in STEP_POSITION_INPUTS]
        axes = {name: {0: "batch"} for name in batched}
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
    with warnings_quiet(), quiet_modelopt():
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


def dequantized_operand(graph: onnx.GraphProto) -> Callable[[onnx.NodeProto], bool]:
    """Whether a node of ``graph`` takes a DequantizeLinear output (directly or through a Transpose): a quantized
    (FP8/INT8) operand."""
    producer = {output: node for node in graph.node for output in node.output}

    def dequantized(name: str) -> bool:
        node = producer.get(name)
        if node is not None and node.op_type == "Transpose":
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "DequantizeLinear"

    return lambda node: any(dequantized(name) for name in node.input)


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
    takes_dequantized = dequantized_operand(inferred.graph)
    initializers: dict[str, int] = {}
    for tensor in inferred.graph.initializer:
        name = onnx.TensorProto.DataType.Name(tensor.data_type)
        initializers[name] = initializers.get(name, 0) + 1
    matmuls = [node for node in inferred.graph.node if node.op_type in ("MatMul", "Gemm")]
    quantized = [node for node in matmuls if takes_dequantized(node)]
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
