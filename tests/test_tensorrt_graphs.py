"""The graphs TensorRT parses, derived from bf16 and FP8-from-bf16 bundles: the attention rewrites on bf16 graphs,
bf16 Resize computed in fp32, the key-only / full mask forms and the TRT_decomposable attribute. Building them
needs TensorRT and a GPU; everything here is the graph side."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_fixtures import RESOLUTION, bf16_bundle, fp8_bf16_bundle

from unidg.export.bf16_emulation import emulate_bf16
from unidg.export.plugins.onnx_rewrite import (
    attention_mask_shapes,
    count_attention_nodes,
    count_plugin_nodes,
    rewrite_attention_file,
)
from unidg.export.tensorrt_graphs import (
    DECOMPOSABLE_ATTRIBUTE,
    GraphDerivation,
    cast_resize_to_fp32,
    derive_graph_file,
    tensorrt_graph_census,
    value_types,
)
from unidg.runtime.bundle import load_bundle

BUNDLES = {"bf16": bf16_bundle, "fp8": lambda: fp8_bf16_bundle()[0]}


def _sequence(bundle) -> int:
    return bundle.context_tokens + (RESOLUTION // 16) * (2 * RESOLUTION // 16)


@pytest.mark.parametrize("precision", list(BUNDLES))
@pytest.mark.parametrize("form", ["key_mask", "plugin"])
def test_attention_rewrite_of_a_bf16_step_graph(tmp_path, precision, form):
    """bf16 tensors are ONNX type 16 to onnx-graphsurgeon (numpy has no bf16): the rewrite must not ask numpy."""
    folder = BUNDLES[precision]()
    bundle = load_bundle(folder, verify=False)
    source = folder / "step.onnx"
    original = onnx.load(str(source), load_external_data=False)
    attentions = count_attention_nodes(original)
    assert attentions >= 2
    target = tmp_path / f"step.{form}.onnx"
    report = rewrite_attention_file(source, target, form=form)
    rewritten = onnx.load(str(target), load_external_data=False)
    sequence = _sequence(bundle)
    if form == "plugin":
        assert report.plugin_nodes_after == attentions == count_plugin_nodes(rewritten)
        assert count_attention_nodes(rewritten) == 0
    else:
        assert report.rewired == attentions
        assert attention_mask_shapes(rewritten) == [[1, 1, 1, sequence]] * attentions
        masks = {n.input[3] for n in rewritten.graph.node if n.op_type == "Attention"}
        original_masks = {n.input[3] for n in original.graph.node if n.op_type == "Attention"}
        types, original_types = value_types(rewritten), value_types(original)
        assert {types[m] for m in masks} == {original_types[m] for m in original_masks}  # mask dtype kept


@pytest.mark.parametrize("precision", list(BUNDLES))
def test_bf16_resize_is_computed_in_fp32_bit_identically(tmp_path, precision):
    folder = BUNDLES[precision]()
    source = folder / "vae_decoder.onnx"
    original = onnx.load(str(source))
    before = tensorrt_graph_census(original)
    assert before["resize"] == ["BFLOAT16->BFLOAT16"] * 3 and before["bf16_resize"] == 3
    cast, count = cast_resize_to_fp32(original)
    assert count == 3
    after = tensorrt_graph_census(cast)
    assert after["resize"] == ["FLOAT->FLOAT"] * 3 and after["bf16_resize"] == 0
    # Nearest resizing moves values: bf16 -> fp32 -> bf16 around it changes no bit (both run as their fp32 emulation).
    latents = np.random.default_rng(0).standard_normal((1, 16, RESOLUTION // 8, RESOLUTION // 4)).astype(np.float32)
    outputs = []
    for model in (original, cast):
        emulated, _ = emulate_bf16(model)
        session = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"latents": latents})[0])
    assert np.array_equal(outputs[0], outputs[1])
    census = derive_graph_file(source, tmp_path / "vae_decoder.trt.onnx", GraphDerivation())
    assert census["bf16_resize"] == 0 and census["resize"] == ["FLOAT->FLOAT"] * 3


@pytest.mark.parametrize("mask", ["key", "full"])
def test_mask_forms_and_the_decomposable_attribute(tmp_path, mask):
    folder = bf16_bundle()
    bundle = load_bundle(folder, verify=False)
    sequence = _sequence(bundle)
    target = tmp_path / "step.trt.onnx"
    derivation = GraphDerivation(attention="native", attention_mask=mask, decomposable=True)
    census = derive_graph_file(folder / "step.onnx", target, derivation)
    rows = 1 if mask == "key" else sequence
    attentions = count_attention_nodes(onnx.load(str(folder / "step.onnx"), load_external_data=False))
    assert census["attention_masks"] == [[1, 1, rows, sequence]] * attentions
    assert census["decomposable"] == [1] * attentions
    saved = onnx.load(str(target))
    with pytest.raises(onnx.checker.ValidationError, match=f"Unrecognized attribute: {DECOMPOSABLE_ATTRIBUTE}"):
        onnx.checker.check_model(saved)  # why the file is validated without it
    plain = derive_graph_file(folder / "step.onnx", tmp_path / "plain.onnx", GraphDerivation(attention="native"))
    assert plain["decomposable"] == [None] * attentions


def test_the_derived_graph_never_replaces_its_source(tmp_path):
    folder = bf16_bundle()
    with pytest.raises(ValueError, match="another file than its source"):
        derive_graph_file(folder / "vae_decoder.onnx", folder / "vae_decoder.onnx", GraphDerivation())
