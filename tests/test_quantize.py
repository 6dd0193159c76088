"""`unidg export quantize`: FP8 and INT8 nano bundles with ModelOpt that run in onnxruntime, their accuracy reports,
the gate failing on a broken calibration, and the refusals."""

from __future__ import annotations

import json

import onnx
import pytest
from export_fixtures import (
    RESOLUTION,
    calib_set,
    fp8_bf16_bundle,
    nano_bundle,
    nano_weights,
    other_weights,
    single_thread,
    workspace,
)

from unidg.calib.build import CalibError
from unidg.core.manifest import read_manifest
from unidg.export.parity import psnr, synthetic_request
from unidg.export.qdq import dequantized_operand
from unidg.export.quantize import (
    HIGH_PRECISION_MODULES,
    AccuracyGateError,
    QuantizationError,
    _reference_bundle,
    quant_config,
    quantize_bundle,
)
from unidg.runtime.bundle import load_bundle
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest

KEPT = ("/transformer/x_embedder/", "/transformer/context_embedder/", "/transformer/time_text_embed/")
KEPT += ("/transformer/norm_out/", "/transformer/proj_out/")


@pytest.fixture(scope="module")
def quantized():
    """{format: (bundle folder, accuracy report)} for FP8 and INT8 with fp32 high precision (the form onnxruntime's
    CPU provider runs; reference: the fp32 nano bundle)."""
    results = {}
    for fmt in ("fp8", "int8"):
        out = workspace() / f"bundle-{fmt}"
        with single_thread():
            report = quantize_bundle(
                nano_weights(), calib_set(), fmt, out, reference=nano_bundle(), high_precision="fp32", progress=None
            )
        results[fmt] = (out, report)
    figures = {fmt: report for fmt, (_, report) in results.items()}
    (workspace() / "quantize.json").write_text(json.dumps(figures, indent=2))
    print("\n" + json.dumps(figures, indent=1))  # recorded in the test log (-s) and docs/export.md
    return results


def _matmul_inputs_from_dequantize(model: onnx.ModelProto) -> dict[str, bool]:
    """For every MatMul/Gemm: is one of its inputs a DequantizeLinear output (directly or through a Transpose)?"""
    takes_dequantized = dequantized_operand(model.graph)
    return {node.name: takes_dequantized(node) for node in model.graph.node if node.op_type in ("MatMul", "Gemm")}


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantized_bundle_passes_its_gate_and_runs_in_onnxruntime(quantized, fmt):
    folder, report = quantized[fmt]
    bundle = load_bundle(folder)  # the runtime's checks, sha256 included
    assert bundle.precision == fmt
    quantization = bundle.metadata["quantization"]
    assert quantization["accuracy"]["passed"] and report["passed"]
    assert quantization["calib"]["fingerprint"] == read_manifest(calib_set()).fingerprint
    assert report["velocity_cosine_mean"] >= 0.995 and report["psnr_min"] >= 30
    assert report["calibration"]["enabled_quantizers"] > 0 and report["calibration"]["zero_amax"] == 0
    request = SynthesisRequest(*synthetic_request(80, seed=5), seed=11)
    images = {}
    for name, path in (("fp32", nano_bundle()), (fmt, folder)):
        with DefectSynthesizer.from_bundle(path) as synthesizer:  # the runtime's own onnxruntime backend
            images[name] = synthesizer.generate(request).diptych
    assert psnr(images[fmt], images["fp32"]) > 30


def test_fp8_graph_is_standard_onnx_with_fp8_weights(quantized):
    folder, _ = quantized["fp8"]
    model = onnx.load(str(folder / "step.onnx"))
    assert not [n for n in model.graph.node if n.domain == "trt"]
    assert {o.domain for o in model.opset_import} == {""} and model.opset_import[0].version >= 19
    fp8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    quantize_nodes = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize_nodes and len(fp8_weights) > len(quantize_nodes)  # weights stored as FP8, + zero points


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_embedders_norm_out_proj_out_and_attention_stay_high_precision(quantized, fmt):
    folder, _ = quantized[fmt]
    matmuls = _matmul_inputs_from_dequantize(onnx.load(str(folder / "step.onnx")))
    kept = {name: q for name, q in matmuls.items() if name.startswith(KEPT)}
    assert kept and not any(kept.values()), kept
    linears = {n: q for n, q in matmuls.items() if "/to_q/" in n or "/ff/net.2/" in n or "/proj_mlp/" in n}
    assert linears and all(linears.values()), linears
    attention = {n: q for n, q in matmuls.items() if n.endswith(("/attn/MatMul", "/attn/MatMul_1"))}
    assert not any(attention.values()), attention
    assert bool(attention) == (fmt == "int8")  # FP8 attention is one fused node (below); INT8 keeps the MatMuls


@pytest.mark.parametrize("fmt", ["fp8"])
def test_attention_stays_one_fused_16bit_node(quantized, fmt):
    """Each attention is one opset-23 Attention node on unquantized Q/K/V with the mask expanded for onnxruntime;
    the engine build's key-only rewrite applies to it as to a portable bundle."""
    from unidg.export.plugins.onnx_rewrite import attention_mask_shapes, rewrite_attention_to_key_mask

    folder, _ = quantized[fmt]
    model = onnx.load(str(folder / "step.onnx"))
    producer = {output: node.op_type for node in model.graph.node for output in node.output}
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    blocks = load_bundle(folder).metadata
    assert len(attention) == 6 and not [n for n in model.graph.node if n.op_type == "Softmax"]  # nano: 2 + 4 blocks
    assert not any(producer.get(i) == "DequantizeLinear" for n in attention for i in n.input[:3])
    assert blocks["attention_form"] == "expand" and blocks["opset"] == 23
    sequence = blocks["context_tokens"] + (RESOLUTION // 16) * (2 * RESOLUTION // 16)
    expanded = attention_mask_shapes(model)  # [B, 1, S_q, S_k]; S_q may be symbolic after the exporter's reshapes
    assert len(expanded) == 6 and all(s[:2] == [1, 1] and s[2] != 1 and s[3] == sequence for s in expanded), expanded
    keyed, report = rewrite_attention_to_key_mask(model)
    assert report.rewired == 6 and attention_mask_shapes(keyed) == [[1, 1, 1, sequence]] * 6


def test_fp8_step_graph_census(quantized):
    """What stays float32 in the FP8 step graph: only the high-precision modules' MatMul/Gemm; no Softmax."""
    from unidg.export.quantize import precision_census

    census = precision_census(onnx.load(str(quantized["fp8"][0] / "step.onnx")))
    assert census["fused_attention"] == 6 and census["softmax"] == 0
    assert census["quantized_matmul_gemm"] == 52 and census["fp32_matmul_gemm"] == 10
    assert census["initializers"]["FLOAT8E4M3FN"] > 0


def test_int8_uses_smoothquant():
    config = quant_config("int8")
    assert config["algorithm"] == {"method": "smoothquant", "alpha": 0.8}
    disabled = [e["quantizer_name"] for e in config["quant_cfg"] if e.get("enable") is False]
    assert disabled[0] == "*" and set(HIGH_PRECISION_MODULES) <= set(disabled)
    assert quant_config("fp8")["algorithm"] == "max"


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_gate_fails_on_a_calibration_with_scales_from_zeros(tmp_path, fmt):
    out = tmp_path / "broken"
    with single_thread(), pytest.raises(AccuracyGateError, match="fails the accuracy gate") as failure:
        quantize_bundle(
            nano_weights(),
            calib_set(),
            fmt,
            out,
            reference=nano_bundle(),
            amax_scale=0.0,
            high_precision="fp32",
            progress=None,
        )
    report = failure.value.report
    assert not report["passed"] and report["calibration"]["amax_replaced"] > 0
    assert report["velocity_cosine_mean"] < 0.995 or report["psnr_min"] < 30
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_calibration_from_other_weights_is_refused(tmp_path):
    with pytest.raises(CalibError, match="not from these weights"):
        quantize_bundle(other_weights(), calib_set(), "fp8", tmp_path / "q", progress=None)
    assert not (tmp_path / "q").exists()


def test_reference_bundle_must_match(quantized):
    fingerprint = read_manifest(nano_weights(), kind="weights").fingerprint
    with pytest.raises(QuantizationError, match="static S=64 bundle but the calibration set is at S=128"):
        _reference_bundle(nano_bundle(), fingerprint, 128, "fp32")
    with pytest.raises(QuantizationError, match="other weights"):
        _reference_bundle(nano_bundle(), "0" * 64, RESOLUTION, "fp32")
    with pytest.raises(QuantizationError, match="must be unquantized"):
        _reference_bundle(quantized["fp8"][0], fingerprint, RESOLUTION, "fp32")
    with pytest.raises(QuantizationError, match="is fp32 but the high precision is bf16.*--precision bf16"):
        _reference_bundle(nano_bundle(), fingerprint, RESOLUTION, "bf16")
    with pytest.raises(QuantizationError, match="int8 keeps fp32"):
        quantize_bundle(nano_weights(), calib_set(), "int8", workspace() / "never", high_precision="bf16")


def test_fp8_from_the_bf16_model_is_bf16_outside_the_quantized_linears(quantized):
    """The default FP8 recipe: calibrated and exported from the bf16 model, gated against a bf16 reference (both
    through the float32 emulation of bf16), VAE and image encoder bf16; the CPU runtime refuses it by name."""
    from unidg.export.quantize import precision_census
    from unidg.runtime.backends.base import BackendError

    out, report = fp8_bf16_bundle()  # shared with the TensorRT graph tests (reference: the bf16 nano bundle)
    print("\nfp8 from bf16:", json.dumps({k: v for k, v in report.items() if k != "calibration"}))
    assert report["passed"] and report["velocity_cosine_mean"] >= 0.995 and report["psnr_min"] >= 30
    bundle = load_bundle(out)
    assert bundle.precision == "fp8" and bundle.metadata["quantization"]["high_precision"] == "bf16"
    census = precision_census(onnx.load(str(out / "step.onnx")))
    before = precision_census(onnx.load(str(quantized["fp8"][0] / "step.onnx")))  # fp32 high precision
    assert census["fp32_initializers"] < 10 < before["fp32_initializers"]  # only the fp32 I/O casts' constants
    assert census["fp32_matmul_gemm"] == 0 and before["fp32_matmul_gemm"] == 10
    assert census["quantized_matmul_gemm"] == 52 and census["fused_attention"] == 6 and census["softmax"] == 0
    assert census["initializers"]["BFLOAT16"] > 0
    for graph in ("vae_encoder", "vae_decoder", "image_encoder"):
        weights = [t for t in onnx.load(str(bundle.graph_path(graph))).graph.initializer if len(t.dims) >= 2]
        assert weights and all(t.data_type == onnx.TensorProto.BFLOAT16 for t in weights), graph  # conv / linear
    with pytest.raises(BackendError, match="computes in bf16.*--high-precision fp32"):
        DefectSynthesizer.from_bundle(out)
