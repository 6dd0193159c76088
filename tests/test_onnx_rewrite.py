"""Opset-23 Attention -> TensorRT plugin node rewrite, on small graphs built here and run in onnxruntime."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from unidg.export.plugins.attention_kernel import reference_biased_attention
from unidg.export.plugins.onnx_rewrite import (
    AttentionRewriteError,
    attention_mask_shapes,
    check_rewritten_model,
    count_attention_nodes,
    count_plugin_nodes,
    is_key_only_shape,
    rewrite_attention_file,
    rewrite_attention_to_key_mask,
    rewrite_attention_to_plugin,
)
from unidg.export.plugins.trt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE

B, H, S, D = 2, 2, 12, 8
QKV = [B, H, S, D]


def _value(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "attention_graph", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def flux_like_model() -> onnx.ModelProto:
    """Three Attention nodes: key bias broadcast by Expand to [B, 1, S, S] (twice, chained) and one without a mask."""
    nodes = [
        helper.make_node("Unsqueeze", ["key_bias", "axes12"], ["mask_keys"]),
        helper.make_node("Expand", ["mask_keys", "full_shape"], ["mask_full"]),
        helper.make_node("Attention", ["q", "k", "v", "mask_full"], ["y1"], name="attn_scaled", scale=0.4),
        helper.make_node("Attention", ["y1", "k", "v", "mask_full"], ["y2"], name="attn_default"),
        helper.make_node("Attention", ["q", "k", "v"], ["y3"], name="attn_plain"),
        helper.make_node("Add", ["y2", "y3"], ["out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"),
        numpy_helper.from_array(np.array([B, 1, S, S], dtype=np.int64), "full_shape"),
    ]
    inputs = [_value(n, QKV) for n in ("q", "k", "v")] + [_value("key_bias", [B, S])]
    return _model(nodes, inputs, [_value("out", QKV)], inits)


def mask_input_model(mask_shape, mask_elem=TensorProto.FLOAT) -> onnx.ModelProto:
    nodes = [helper.make_node("Attention", ["q", "k", "v", "mask"], ["out"], name="attn")]
    inputs = [_value(n, QKV) for n in ("q", "k", "v")] + [_value("mask", mask_shape, mask_elem)]
    return _model(nodes, inputs, [_value("out", QKV)])


def _inputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {n: rng.standard_normal(QKV).astype(np.float32) for n in ("q", "k", "v")}
    bias = (rng.standard_normal((B, S)) * 1.5).astype(np.float32)
    bias[0, :3] = -np.inf  # padded keys
    bias[1, 5] += math.log(512)  # a folded text key
    feeds["key_bias"] = bias
    return feeds


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs=None) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(outputs, {k: v for k, v in feeds.items() if k in names})


def _plugin_biases(rewritten: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate only the bias inputs of the plugin nodes (onnxruntime cannot run the plugin itself)."""
    graph = gs.import_onnx(rewritten)
    plugins = [n for n in graph.nodes if n.op == PLUGIN_NAME]
    graph.outputs = [n.inputs[3] for n in plugins]
    for tensor in graph.outputs:
        tensor.dtype = np.float32
    graph.cleanup()
    values = _run(gs.export_onnx(graph), feeds)
    return {n.name: value for n, value in zip(plugins, values)}


def _torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x))


def test_original_graph_runs_in_onnxruntime_and_matches_torch() -> None:
    feeds = _inputs()
    (out,) = _run(flux_like_model(), feeds)
    q, k, v, bias = (_torch(feeds[n]) for n in ("q", "k", "v", "key_bias"))
    y1 = reference_biased_attention(q, k, v, bias, 0.4)
    y2 = reference_biased_attention(y1, k, v, bias)
    y3 = reference_biased_attention(q, k, v, torch.zeros(B, S))
    assert np.abs(out - (y2 + y3).numpy()).max() <= 1e-5


def test_rewrite_replaces_every_attention_node() -> None:
    original = flux_like_model()
    rewritten, report = rewrite_attention_to_plugin(original)
    assert report.attention_nodes_before == 3 == report.plugin_nodes_after
    assert report.attention_nodes_after == 0
    assert count_attention_nodes(rewritten) == 0 and count_plugin_nodes(rewritten) == 3
    assert count_attention_nodes(original) == 3  # the input model is left alone
    checked = check_rewritten_model(original, rewritten)
    assert (checked.attention_nodes_before, checked.plugin_nodes_after) == (3, 3)

    by_name = {r.attention_node: r for r in report.rewritten}
    assert by_name["attn_scaled"].scale == pytest.approx(0.4)
    assert by_name["attn_default"].scale == pytest.approx(1 / math.sqrt(D))
    assert "Expand" in by_name["attn_scaled"].bias_source
    assert by_name["attn_plain"].bias_source.startswith("no mask")

    assert any(o.domain == PLUGIN_NAMESPACE for o in rewritten.opset_import)
    plugin_nodes = [n for n in rewritten.graph.node if n.op_type == PLUGIN_NAME]
    for node in plugin_nodes:
        assert node.domain == PLUGIN_NAMESPACE
        attrs = {a.name: a for a in node.attribute}
        assert attrs["plugin_namespace"].type == onnx.AttributeProto.STRING
        assert attrs["plugin_namespace"].s == PLUGIN_NAMESPACE.encode()
        assert attrs["aot"].type == onnx.AttributeProto.INT and attrs["aot"].i == 1
        assert attrs["scale"].type == onnx.AttributeProto.FLOAT and attrs["scale"].f > 0
        assert len(node.input) == 4 and len(node.output) == 1
    assert {n.output[0] for n in plugin_nodes} == {"y1", "y2", "y3"}


def test_rewritten_biases_and_plugin_semantics_reproduce_the_original() -> None:
    original = flux_like_model()
    rewritten, _ = rewrite_attention_to_plugin(original)
    feeds = _inputs(seed=3)
    biases = _plugin_biases(rewritten, feeds)
    key_bias = feeds["key_bias"]
    assert np.array_equal(biases["attn_scaled_plugin"], key_bias)
    assert np.array_equal(biases["attn_default_plugin"], key_bias)
    assert np.array_equal(biases["attn_plain_plugin"], np.zeros((B, S), np.float32))

    # evaluate the rewritten graph with the plugin's definition and compare with onnxruntime on the original
    q, k, v = (_torch(feeds[n]) for n in ("q", "k", "v"))
    scales = {
        n.name: next(a.f for a in n.attribute if a.name == "scale")
        for n in rewritten.graph.node
        if n.op_type == PLUGIN_NAME
    }
    b = {name: _torch(value) for name, value in biases.items()}
    y1 = reference_biased_attention(q, k, v, b["attn_scaled_plugin"], scales["attn_scaled_plugin"])
    y2 = reference_biased_attention(y1, k, v, b["attn_default_plugin"], scales["attn_default_plugin"])
    y3 = reference_biased_attention(q, k, v, b["attn_plain_plugin"], scales["attn_plain_plugin"])
    (expected,) = _run(original, feeds)
    assert np.abs((y2 + y3).numpy() - expected).max() <= 1e-5


def test_full_mask_input_needs_the_first_row_policy() -> None:
    model = mask_input_model([B, 1, S, S])
    with pytest.raises(AttentionRewriteError, match="first_row"):
        rewrite_attention_to_plugin(model)
    rewritten, report = rewrite_attention_to_plugin(model, mask_rows="first_row")
    check_rewritten_model(model, rewritten)
    assert "first query row" in report.rewritten[0].bias_source
    feeds = _inputs(seed=5)
    feeds["mask"] = np.broadcast_to(feeds["key_bias"][:, None, None, :], (B, 1, S, S)).copy()
    (bias,) = _plugin_biases(rewritten, feeds).values()
    assert np.array_equal(bias, feeds["key_bias"])
    (expected,) = _run(model, feeds)
    got = reference_biased_attention(*(_torch(feeds[n]) for n in ("q", "k", "v")), _torch(bias))
    assert np.abs(got.numpy() - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "mask_shape, elem",
    [([B, 1, 1, S], TensorProto.BOOL), ([1, 1, 1, S], TensorProto.FLOAT16), ([1, S], TensorProto.FLOAT)],
)
def test_key_only_masks_of_other_types_and_ranks(mask_shape, elem) -> None:
    model = mask_input_model(mask_shape, elem)
    rewritten, report = rewrite_attention_to_plugin(model)
    check_rewritten_model(model, rewritten)
    assert report.rewritten[0].bias_source == "key-only mask"
    rng = np.random.default_rng(7)
    if elem == TensorProto.BOOL:
        mask = rng.random(mask_shape) > 0.3
        expected = np.where(mask, 0.0, -np.inf).astype(np.float32).reshape(-1, S)
    else:
        dtype = np.float16 if elem == TensorProto.FLOAT16 else np.float32
        mask = rng.standard_normal(mask_shape).astype(dtype)
        expected = mask.astype(np.float32).reshape(-1, S)
    feeds = {**_inputs(), "mask": mask}
    (bias,) = _plugin_biases(rewritten, feeds).values()
    assert bias.shape == (B, S)
    assert np.array_equal(bias, np.broadcast_to(expected, (B, S)))


def test_unsupported_attention_is_refused_with_the_node_name() -> None:
    causal = _model(
        [helper.make_node("Attention", ["q", "k", "v"], ["out"], name="causal_attn", is_causal=1)],
        [_value(n, QKV) for n in ("q", "k", "v")],
        [_value("out", QKV)],
    )
    with pytest.raises(AttentionRewriteError, match="causal_attn.*is_causal"):
        rewrite_attention_to_plugin(causal)
    three_d = _model(
        [helper.make_node("Attention", ["q", "k", "v"], ["out"], name="packed", q_num_heads=H, kv_num_heads=H)],
        [_value(n, [B, S, H * D]) for n in ("q", "k", "v")],
        [_value("out", [B, S, H * D])],
    )
    with pytest.raises(AttentionRewriteError, match="packed.*4-D"):
        rewrite_attention_to_plugin(three_d)
    with pytest.raises(ValueError, match="mask_rows"):
        rewrite_attention_to_plugin(causal, mask_rows="any")


def test_inverse_check_catches_a_lost_node() -> None:
    original = flux_like_model()
    rewritten, _ = rewrite_attention_to_plugin(original)
    graph = gs.import_onnx(rewritten)
    plugin = next(n for n in graph.nodes if n.op == PLUGIN_NAME and n.outputs[0].name == "y3")
    plugin.op, plugin.domain, plugin.attrs = "Identity", "", {}
    plugin.inputs = plugin.inputs[:1]
    broken = gs.export_onnx(graph.cleanup())
    with pytest.raises(AttentionRewriteError, match="3 Attention node\\(s\\) before but 2 plugin"):
        check_rewritten_model(original, broken)


def test_key_only_shape_rule() -> None:
    assert is_key_only_shape([2, 1, 1, 12]) and is_key_only_shape([1, 12]) and is_key_only_shape(["B", 1, 1, "S"])
    assert not is_key_only_shape([2, 1, 12, 12]) and not is_key_only_shape([2, 4, 1, 12])
    assert not is_key_only_shape(None) and not is_key_only_shape([2, "S", 12])


def test_file_rewrite(tmp_path) -> None:
    src, dst = tmp_path / "step.onnx", tmp_path / "out" / "step_trt.onnx"
    onnx.save(flux_like_model(), src)
    report = rewrite_attention_file(src, dst)
    assert report.plugin_nodes_after == 3
    assert count_plugin_nodes(onnx.load(dst)) == 3
    with pytest.raises(FileNotFoundError):
        rewrite_attention_file(tmp_path / "missing.onnx", dst)


def test_file_rewrite_keeps_external_weights_unloaded(tmp_path) -> None:
    model = flux_like_model()
    model.graph.initializer.append(numpy_helper.from_array(np.full(QKV, 0.5, np.float32), "offset"))
    model.graph.node.append(helper.make_node("Add", ["out", "offset"], ["out_offset"]))
    model.graph.output[0].name = "out_offset"
    src = tmp_path / "bundle" / "step.onnx"
    src.parent.mkdir()
    onnx.save_model(model, src, save_as_external_data=True, location="step.onnx.data", size_threshold=512)
    feeds = _inputs(seed=9)

    for dst in (tmp_path / "trt" / "step_trt.onnx", src):  # another folder (data copied), then in place
        report = rewrite_attention_file(src, dst)
        assert report.plugin_nodes_after == 3
        assert (dst.parent / "step.onnx.data").is_file()
        loaded = onnx.load(dst)
        assert count_plugin_nodes(loaded) == 3 and count_attention_nodes(loaded) == 0
        offset = next(t for t in loaded.graph.initializer if t.name == "offset")
        assert np.array_equal(numpy_helper.to_array(offset), np.full(QKV, 0.5, np.float32))
        # the biases feeding the plugin nodes still evaluate to the key bias
        biases = _plugin_biases(loaded, feeds)
        assert np.array_equal(biases["attn_scaled_plugin"], feeds["key_bias"])
        assert not dst.with_name(dst.name + ".tmp").exists()


def test_key_mask_rewrite_feeds_the_key_only_mask_and_keeps_the_numbers(tmp_path) -> None:
    """Attention fed [B, 1, 1, S] (TensorRT's broadcast form) computes what onnxruntime computes with the
    [B, 1, S, S] broadcast; ONNX's reference evaluator runs it, onnxruntime's CPU kernel refuses it."""
    from onnx.reference import ReferenceEvaluator

    model = flux_like_model()
    keyed, report = rewrite_attention_to_key_mask(model)
    assert report.attention_nodes == 3 and report.rewired == 2 and report.masks == ("mask_keys",)
    assert attention_mask_shapes(model) == [[B, 1, S, S], [B, 1, S, S], None]
    shapes = attention_mask_shapes(keyed)  # node order may change (topological sort)
    assert [shape for shape in shapes if shape] == [[B, 1, 1, S]] * 2 and shapes.count(None) == 1
    assert not [n for n in keyed.graph.node if n.op_type == "Expand"]  # the broadcast is gone
    onnx.checker.check_model(keyed)
    feeds = _inputs(seed=3)
    (want,) = _run(model, feeds)
    (got,) = ReferenceEvaluator(keyed).run(None, feeds)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    with pytest.raises(Exception, match="inconsistent q_sequence_length"):
        _run(keyed, feeds)
    src, dst = tmp_path / "step.onnx", tmp_path / "step.native.onnx"
    onnx.save(model, src)
    assert rewrite_attention_file(src, dst, form="key_mask").rewired == 2
    assert [shape for shape in attention_mask_shapes(onnx.load(dst)) if shape] == [[B, 1, 1, S]] * 2


def test_key_mask_rewrite_keeps_the_mask_dtype_and_refuses_untraceable_masks() -> None:
    nodes = [
        helper.make_node("Unsqueeze", ["key_bias", "axes12"], ["mask_keys"]),
        helper.make_node("Cast", ["mask_keys"], ["mask_half"], to=TensorProto.FLOAT16),
        helper.make_node("Expand", ["mask_half", "full_shape"], ["mask_full"]),
        helper.make_node("Attention", ["q", "k", "v", "mask_full"], ["out"], name="attn"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"),
        numpy_helper.from_array(np.array([B, 1, S, S], dtype=np.int64), "full_shape"),
    ]
    half = TensorProto.FLOAT16
    inputs = [_value(n, QKV, half) for n in ("q", "k", "v")] + [_value("key_bias", [B, S])]
    keyed, _ = rewrite_attention_to_key_mask(_model(nodes, inputs, [_value("out", QKV, half)], inits))
    attention = next(n for n in keyed.graph.node if n.op_type == "Attention")
    producer = next(n for n in keyed.graph.node if attention.input[3] in n.output)
    assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT16
    with pytest.raises(AttentionRewriteError, match="not an Expand of a \\[B, 1, 1, S_k\\] tensor"):
        rewrite_attention_to_key_mask(mask_input_model([B, 1, S, S]))
