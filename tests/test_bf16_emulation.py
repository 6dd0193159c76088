"""bf16 graphs on onnxruntime's CPU provider through their float32 emulation (export/bf16_emulation.py)."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from unidg.export.bf16_emulation import EmulationError, emulate_bf16

BF16 = ml_dtypes.bfloat16


def _bf16(values: np.ndarray) -> np.ndarray:
    return values.astype(BF16).astype(np.float32)


def _small_bf16_graph(weight: np.ndarray) -> onnx.ModelProto:
    """float32 in -> Cast bf16 -> MatMul (bf16 weight) -> Add -> Softmax -> Cast float32 out."""
    initializer = numpy_helper.from_array(weight.astype(BF16), "w")
    initializer.data_type = TensorProto.BFLOAT16
    nodes = [
        helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.BFLOAT16),
        helper.make_node("MatMul", ["x16", "w"], ["h"]),
        helper.make_node("Add", ["h", "x16"], ["s"]),
        helper.make_node("Softmax", ["s"], ["p"], axis=-1),
        helper.make_node("Cast", ["p"], ["y"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes,
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
        [initializer],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    return model


def test_emulation_rounds_every_bf16_tensor_like_a_bf16_kernel_with_float32_accumulation() -> None:
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4, 4)).astype(np.float32)
    model = _small_bf16_graph(weight)
    with pytest.raises(Exception, match="(?i)NOT_IMPLEMENTED|Could not find an implementation"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])  # why it exists
    emulated, rounded = emulate_bf16(model)
    assert rounded == 4  # x16, h, s, p
    assert all(t.data_type == TensorProto.FLOAT for t in emulated.graph.initializer)
    session = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
    actual = session.run(None, {"x": x})[0]
    # The same computation by hand: each op in float32 on bf16 operands, its output rounded to bf16.
    x16 = _bf16(x)
    h = _bf16(x16 @ _bf16(weight))
    s = _bf16(h + x16)
    e = np.exp(s - s.max(-1, keepdims=True))
    expected = _bf16(e / e.sum(-1, keepdims=True))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=2**-8)  # at most one bf16 step of a value < 1
    assert np.abs(actual - _float_softmax(x, weight)).max() > 1e-4  # float32 alone would not round like this


def _float_softmax(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    s = x @ weight + x
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_emulation_refuses_control_flow_it_does_not_rewrite() -> None:
    branch = helper.make_graph([], "b", [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])])
    node = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []), helper.make_tensor_value_info("x", 1, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(EmulationError, match="control-flow"):
        emulate_bf16(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def test_bf16_bundle_graphs_match_the_bf16_torch_model_through_the_emulation(tmp_path: Path) -> None:
    from export_fixtures import RESOLUTION, nano_weights

    from unidg.core.weights_folder import read_weights
    from unidg.export.bundle import export_bundle
    from unidg.export.parity import BF16_EMULATION_MAX_ABS, ParityError, graph_parity, trajectory_parity
    from unidg.train.loading import load_weights_model

    export_bundle(nano_weights(), tmp_path / "bf16", precision="bf16", resolution=RESOLUTION, progress=None)
    weights = read_weights(nano_weights())
    model = load_weights_model(weights)
    results = graph_parity(tmp_path / "bf16", model, batch=1)
    assert set(results) == set(BF16_EMULATION_MAX_ABS)
    for name, result in results.items():
        assert result.polygraphy_passed, f"{name}: {result.figures}"
        assert 0 < result.figures.max_abs <= BF16_EMULATION_MAX_ABS[name]
    assert str(next(model.transformer.parameters()).dtype) == "torch.float32"  # the caller's model is not cast
    with pytest.raises(ParityError, match="bf16.*no-trajectory"):
        trajectory_parity(tmp_path / "bf16", model)
