"""`unidg export onnx`: the bundle of a nano weights folder, its manifest, atomic writing, refusals, variants
(dynamic batch / sequence, plugin attention) and the full preset's one-block slice with external data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_fixtures import RESOLUTION, nano_bundle, nano_weights, single_thread, workspace

from unidg.cli import main
from unidg.core.manifest import read_manifest, sha256_file, write_manifest
from unidg.core.settings import UniDGSettings
from unidg.core.weights_folder import OutputFolderError, WeightsError
from unidg.export.bundle import export_bundle
from unidg.export.onnx_export import (
    ExportError,
    ExportOptions,
    ModelFacts,
    export_graph,
    graph_example_inputs,
    graph_module,
)
from unidg.export.preset_slice import export_slice
from unidg.export.step_model import float32_rope
from unidg.runtime.bundle import GRAPH_INPUTS, GRAPH_NAMES, BundleError, load_bundle


def test_bundle_from_nano_weights_has_the_v1_manifest():
    bundle = load_bundle(nano_bundle())  # the runtime's own checks: format, sha256 of every file, shapes
    meta = bundle.metadata
    weights = read_manifest(nano_weights(), kind="weights")
    assert meta["weights"]["fingerprint"] == weights.fingerprint
    assert meta["resolution"] == RESOLUTION == meta["settings"]["resolution"]
    assert meta["precision"] == "fp32" and meta["opset"] == 23 and meta["batch"] == 1
    assert meta["attention"] == "portable" and meta["attention_form"] == "expand"
    assert meta["context_tokens"] == 1 + meta["reference_tokens"]  # folded text token + Redux tokens
    assert {"torch", "onnx", "onnxruntime", "onnxscript"} <= set(meta["tools"])
    for name in GRAPH_NAMES:
        graph = meta["graphs"][name]
        assert list(graph["inputs"]) == list(GRAPH_INPUTS[name])
        assert all(spec["dtype"] == "float32" for spec in {**graph["inputs"], **graph["outputs"]}.values())
        assert bundle.files[graph["file"]] == sha256_file(bundle.path / graph["file"])
    step = meta["graphs"]["step"]
    n = (RESOLUTION // 16) * (2 * RESOLUTION // 16)
    assert step["inputs"]["key_bias"]["shape"] == [1, meta["context_tokens"] + n]
    assert step["op_counts"]["Attention"] == 6  # 2 double + 4 single blocks, fused opset-23 Attention
    assert "Expand" in step["op_counts"] and not any("DOUBLE" in k for k in step["op_counts"])
    model = onnx.load(str(bundle.path / "step.onnx"))
    assert not [n for n in model.graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.DOUBLE]


def test_export_refuses_weights_without_manifest(tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(nano_weights(), folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(WeightsError, match="no manifest.json.*unidg train merge"):
        export_bundle(folder, tmp_path / "out", resolution=RESOLUTION, progress=None)
    assert not (tmp_path / "out").exists()


def test_export_refuses_changed_weights_and_bad_resolution(tmp_path):
    folder = tmp_path / "weights"
    shutil.copytree(nano_weights(), folder)
    settings = json.loads((folder / "unidg.json").read_text())
    (folder / "unidg.json").write_text(json.dumps({**settings, "alpha": 3.0}))
    with pytest.raises(WeightsError, match="unidg.json does not match its manifest"):
        export_bundle(folder, tmp_path / "out", progress=None)
    with pytest.raises(OutputFolderError, match="--resolution 72: supported are multiples of 16 from 16 to 1024"):
        export_bundle(nano_weights(), tmp_path / "out", resolution=72, progress=None)
    with pytest.raises(ExportError, match="--precision"):
        ExportOptions(resolution=64, precision="fp64")


def test_cli_refuses_with_a_clear_message(tmp_path, capsys):
    assert main(["export", "onnx", "--weights", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert main(["export", "onnx", "--weights", str(nano_weights()), "--out", str(nano_bundle())]) == 2
    assert "already exists" in capsys.readouterr().err


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    import unidg.export.bundle as bundle_module

    def fail_midway(model, folder, options, **options_of_the_call):
        (Path(folder) / "step.onnx").write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(bundle_module, "export_graphs", fail_midway)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_bundle(nano_weights(), tmp_path / "out", resolution=RESOLUTION, progress=None)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the staging folder


def test_static_bundle_refuses_another_resolution():
    bundle = load_bundle(nano_bundle())
    other = UniDGSettings.from_dict({**bundle.settings.to_dict(), "resolution": 128})
    with pytest.raises(BundleError, match="resolution"):
        load_bundle(nano_bundle(), expected_settings=other)
    session = ort.InferenceSession(str(bundle.graph_path("step")), providers=["CPUExecutionProvider"])
    facts = ModelFacts.of(_nano_model(), 128)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, graph_example_inputs("step", facts, 1))


def _nano_model():
    from export_fixtures import load_nano_model

    return load_nano_model()


def test_step_graph_has_one_matmul_per_stream_and_the_same_outputs_fused_or_not(tmp_path):
    """The step graph's Q, K and V are one matmul per attention stream (2 per double block), a single block's with its
    MLP input (1 per single block), whether or not diffusers' ``fuse_qkv_projections()`` fused the model's own: same
    graph interface, the unfused model's outputs to float rounding."""
    model = _nano_model()
    feeds = graph_example_inputs("step", ModelFacts.of(model, RESOLUTION), 1)
    with torch.no_grad(), float32_rope(model):
        expected = graph_module("step", model)(*[torch.from_numpy(a) for a in feeds.values()]).numpy()
    model.transformer.fuse_qkv_projections()
    with single_thread():
        export_graph("step", model, tmp_path, ExportOptions(resolution=RESOLUTION), progress=None)
    graph = onnx.load(str(tmp_path / "step.onnx"))
    config = model.transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    mlp = model.transformer.single_transformer_blocks[0].mlp_hidden_dim
    weights = {tensor.name: sorted(tensor.dims) for tensor in graph.graph.initializer if "model." not in tensor.name}

    def projections(width: int) -> int:  # matmuls whose weight the lowering fused (not one of the model's own)
        matmuls = [node for node in graph.graph.node if node.op_type in ("MatMul", "Gemm")]
        return sum(any(weights.get(x) == sorted((inner, width)) for x in node.input) for node in matmuls)

    assert projections(3 * inner) == 2 * config.num_layers
    assert projections(3 * inner + mlp) == config.num_single_layers
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, feeds)[0] - expected).max() < 1e-4


def test_dynamic_batch_and_sequence_step_graph_runs_at_other_shapes(tmp_path):
    model = _nano_model()
    options = ExportOptions(resolution=RESOLUTION, batch="dynamic", dynamic_sequence=True, max_batch=4)
    with single_thread():
        record = export_graph("step", model, tmp_path, options, progress=None)
    assert record.inputs["x"]["shape"][0] == "batch" and isinstance(record.inputs["x"]["shape"][1], str)
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    for batch, resolution in ((1, 64), (3, 96)):
        feeds = graph_example_inputs("step", ModelFacts.of(model, resolution), batch, seed=batch)
        with torch.no_grad(), float32_rope(model):
            expected = graph_module("step", model)(*[torch.from_numpy(a) for a in feeds.values()]).numpy()
        actual = session.run(None, feeds)[0]
        assert actual.shape == expected.shape
        assert np.abs(actual - expected).max() < 1e-4


def test_plugin_attention_replaces_every_attention_node(tmp_path):
    from unidg.export.plugins.onnx_rewrite import count_attention_nodes, count_plugin_nodes

    model = _nano_model()
    with single_thread():
        record = export_graph("step", model, tmp_path, ExportOptions(resolution=RESOLUTION, attention="plugin"))
    graph = onnx.load(str(tmp_path / "step.onnx"))
    assert count_attention_nodes(graph) == 0 and count_plugin_nodes(graph) == 6
    assert "Attention" not in record.op_counts
    onnx.checker.check_model(str(tmp_path / "step.onnx"))


def test_full_preset_slice_exports_with_external_data(tmp_path):
    # The real FLUX widths except the head count (1 head of 128): the meta-device path, slicing, random weights,
    # external data and the path-based checker, at test size. The full 1-block slice: docs/export.md.
    record = export_slice(tmp_path, preset="full", heads=1, resolution=64, external_data=True, progress=None)
    assert record.data_files == ("step.onnx.data",)
    assert (tmp_path / "step.onnx.data").stat().st_size > (tmp_path / "step.onnx").stat().st_size
    onnx.checker.check_model(str(tmp_path / "step.onnx"))
    assert record.inputs["ctx"]["shape"] == [1, 1 + 729, 4096]  # folded text + 729 SigLIP/Redux tokens, J = 4096
    model = onnx.load(str(tmp_path / "step.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_outputs()[0].name == "x_next"


def test_workspace_is_private():
    assert workspace().is_dir()


def test_fp16_step_graph_keeps_float32_io_and_runs(tmp_path):
    import copy

    from unidg.export.onnx_export import cast_for_precision

    reference = _nano_model()
    model = cast_for_precision(copy.deepcopy(reference), "fp16")
    with single_thread():
        record = export_graph("step", model, tmp_path, ExportOptions(resolution=RESOLUTION, precision="fp16"))
    assert all(spec["dtype"] == "float32" for spec in {**record.inputs, **record.outputs}.values())
    graph = onnx.load(str(tmp_path / "step.onnx")).graph
    dtypes = {t.data_type for t in graph.initializer if t.name.endswith(".weight") and len(t.dims) == 2}
    assert dtypes == {onnx.TensorProto.FLOAT16}  # weights are fp16 inside; casts happen in the graph
    feeds = graph_example_inputs("step", ModelFacts.of(reference, RESOLUTION), 1)
    with torch.no_grad():
        expected = graph_module("step", reference)(*[torch.from_numpy(a) for a in feeds.values()]).numpy()
    actual = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.abs(actual - expected).max() / np.abs(expected).max() < 1e-3  # fp16 velocity, float32 update


def test_fold_form_step_graph_matches_the_training_fold_and_zeroes_fully_masked_elements(tmp_path):
    # The exporter's fold is the training processor's: same numbers, and a batch element whose keys are all
    # masked gives attention output 0 (x_next then follows the attention-free velocity, not an average of V).
    from unidg.train.attention import set_attention_backend

    model = _nano_model()
    options = ExportOptions(resolution=RESOLUTION, portable_mask="fold", batch="dynamic", max_batch=2)
    with single_thread():
        export_graph("step", model, tmp_path, options, progress=None)
    attention = [n for n in onnx.load(str(tmp_path / "step.onnx")).graph.node if n.op_type == "Attention"]
    assert len(attention) == 6 and all(len(n.input) == 3 or not n.input[3] for n in attention)  # no mask input
    feeds = graph_example_inputs("step", ModelFacts.of(model, RESOLUTION), 2, seed=3)
    feeds["key_bias"][1] = -np.inf
    set_attention_backend(model.transformer, "headdim_fold")
    with torch.no_grad(), float32_rope(model):
        expected = graph_module("step", model)(*[torch.from_numpy(a) for a in feeds.values()]).numpy()
    set_attention_backend(model.transformer, "sdpa")
    actual = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.isfinite(actual).all()
    assert np.abs(actual - expected).max() < 1e-4


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--batch", "dynamic", "--max-batch", "0"], "--max-batch 0: the upper bound of a dynamic batch"),
        (["--max-batch", "-3"], "--max-batch -3"),
        (["--resolution", "100000"], "--resolution 100000: supported are multiples of 16 from 16 to 1024"),
        (["--resolution", "1040"], "from 16 to 1024"),
    ],
)
def test_export_onnx_refuses_bad_sizes_before_reading_the_weights(tmp_path, capsys, extra, named):
    args = ["export", "onnx", "--weights", str(tmp_path / "no-weights"), "--out", str(tmp_path / "b"), *extra]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert named in error and "no-weights" not in error and "Traceback" not in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--workspace-gb", "nan"], "--workspace-gb nan: give a finite number of GiB > 0"),
        (["--workspace-gb", "inf"], "--workspace-gb inf"),
        (["--workspace-gb", "0"], "--workspace-gb 0.0"),
        (["--max-batch", "0"], "--max-batch 0: must be >= 1"),
        (["--min-batch", "-1"], "--min-batch -1"),
        (["--max-resolution", "100000"], "--max-resolution 100000: must be a multiple of 16 in 16..1024"),
    ],
)
def test_engine_options_are_checked(tmp_path, capsys, extra, named):
    assert main(["export", "trtexec", "--bundle", str(nano_bundle()), "--out", str(tmp_path / "t"), *extra]) == 2
    error = capsys.readouterr().err
    assert named in error and "Traceback" not in error
    assert list(tmp_path.iterdir()) == []


def _reserialized(source: Path, target: Path, change_weight: bool = False) -> None:
    """``source``'s graph saved again with other bytes (producer name), optionally one weight changed."""
    model = onnx.load(str(source))
    model.producer_name = "another exporter"
    if change_weight:
        from onnx import numpy_helper

        first = model.graph.initializer[0]
        array = numpy_helper.to_array(first).copy()
        array.flat[0] += 1.0
        first.CopyFrom(numpy_helper.from_array(array, first.name))
    onnx.save(model, str(target))


def test_share_graphs_takes_the_other_bundles_identical_graphs_byte_for_byte(tmp_path):
    from export_fixtures import load_nano_model

    from unidg.export.onnx_export import ExportOptions, ModelFacts, export_graphs
    from unidg.export.shared_graphs import SHAREABLE_GRAPHS, share_graphs

    staging = tmp_path / "staging"
    staging.mkdir()
    options = ExportOptions(resolution=RESOLUTION)
    with single_thread():
        model = load_nano_model()
        records = export_graphs(model, staging, options, graphs=SHAREABLE_GRAPHS, progress=None)
    other = tmp_path / "other"
    shutil.copytree(nano_bundle(), other)
    # The other bundle's VAE encoder: same computation, other bytes; its image encoder: one weight changed.
    _reserialized(nano_bundle() / "vae_encoder.onnx", other / "vae_encoder.onnx")
    _reserialized(nano_bundle() / "image_encoder.onnx", other / "image_encoder.onnx", change_weight=True)
    write_manifest(other, "bundle", read_manifest(nano_bundle()).metadata)
    before = {name: (staging / f"{name}.onnx").read_bytes() for name in SHAREABLE_GRAPHS}
    assert before["vae_encoder"] != (other / "vae_encoder.onnx").read_bytes()

    messages = []
    shared_records, entry = share_graphs(staging, records, other, ModelFacts.of(model, RESOLUTION), 1, messages.append)

    assert (staging / "vae_encoder.onnx").read_bytes() == (other / "vae_encoder.onnx").read_bytes()
    assert (staging / "image_encoder.onnx").read_bytes() == before["image_encoder"], messages
    assert entry["graphs"] == ["vae_encoder", "vae_decoder"] and entry["fingerprint"]
    assert any("image_encoder: kept" in m and "weights differ" in m for m in messages), messages
    assert shared_records["vae_encoder"].inputs == records["vae_encoder"].inputs
