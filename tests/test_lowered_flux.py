"""The lowered transformer of the ONNX step graphs (unidg.export.lowered_flux) against diffusers' forward.

LoweredFlux recomputes FLUX from the same weights in fewer, larger kernels; every form it can be exported in must give
the velocity ``UniDGModel.velocity`` gives (float rounding only), and its exported step graph must stay that small.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_fixtures import single_thread

from unidg.export.lowered_flux import ATTENTION_FORMS, ROPE_FORMS, LoweredFlux
from unidg.export.onnx_export import ExportOptions, ModelFacts, export_graph, step_example_inputs
from unidg.export.step_model import StepHeadModel, StepModel, StepTailModel, float32_rope
from unidg.train.model import UniDGModel

RESOLUTION = 64
STEP_KEYS = ("x", "cond", "ctx", "key_bias", "sigma", "guidance", "img_ids", "txt_ids")


@pytest.fixture(scope="module")
def model() -> UniDGModel:
    return UniDGModel.from_preset("nano", seed=3).eval()


def _inputs(model: UniDGModel, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    facts = ModelFacts.of(model, RESOLUTION)
    return {k: torch.from_numpy(v) for k, v in step_example_inputs(facts, batch, seed=seed).items()}


def _reference_velocity(model: UniDGModel, inputs: dict, pooled=None) -> torch.Tensor:
    with torch.no_grad(), float32_rope(model):
        return model.velocity(*(inputs[k] for k in STEP_KEYS), pooled=pooled)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("rope", ROPE_FORMS)
@pytest.mark.parametrize("attention", ATTENTION_FORMS)
def test_every_form_equals_diffusers_forward(model, attention, rope, batch):
    inputs = _inputs(model, batch)
    reference = _reference_velocity(model, inputs)
    with torch.no_grad(), single_thread():
        lowered = LoweredFlux(model, attention=attention, rope=rope)(*(inputs[k] for k in STEP_KEYS))
    assert lowered.shape == reference.shape
    assert (lowered - reference).abs().max().item() <= 1e-5 * max(1.0, reference.abs().max().item())


def test_pooled_instruction_and_fused_projections(model):
    """A UniDG-Text step (pooled input) and a transformer whose Q/K/V diffusers already fused."""
    inputs = _inputs(model, 1, seed=1)
    pooled = torch.randn(1, model.transformer.config.pooled_projection_dim)
    reference = _reference_velocity(model, inputs, pooled=pooled)
    fused = UniDGModel.from_preset("nano", seed=3).eval()
    fused.transformer.fuse_qkv_projections()
    with torch.no_grad():
        lowered = LoweredFlux(fused)(*(inputs[k] for k in STEP_KEYS), pooled=pooled)
        unpooled = LoweredFlux(model)(*(inputs[k] for k in STEP_KEYS))
    assert (lowered - reference).abs().max().item() < 1e-5
    assert (unpooled - reference).abs().max().item() > 1e-4  # the instruction reaches the velocity


def test_bf16_model_stays_within_bf16_rounding(model):
    bf16 = UniDGModel.from_preset("nano", seed=3).to(torch.bfloat16).eval()
    inputs = _inputs(bf16, 1)
    reference = _reference_velocity(model, inputs)  # the float32 model
    with torch.no_grad():
        lowered = LoweredFlux(bf16)(*(inputs[k] for k in STEP_KEYS)).float()
        diffusers = _reference_velocity(bf16, inputs).float()
    scale = reference.abs().max().item()
    # the lowered bf16 forward is no further from float32 than diffusers' own bf16 forward (plus rounding)
    assert (lowered - reference).abs().max().item() <= 1.5 * (diffusers - reference).abs().max().item() + 1e-3 * scale


@pytest.mark.parametrize("batch", [1, 2])
def test_head_and_tail_equal_the_step(model, batch):
    inputs = _inputs(model, batch)
    head_args = [inputs[k] for k in STEP_KEYS]
    blocks = len(model.transformer.transformer_blocks) + len(model.transformer.single_transformer_blocks)
    with torch.no_grad(), float32_rope(model):
        reference_head = StepHeadModel(model)(*head_args)
        head = StepHeadModel(model, LoweredFlux(model, blocks=(0, 1)))(*head_args)
        for ours, theirs in zip(head, reference_head):
            assert ours.shape == theirs.shape and (ours - theirs).abs().max().item() < 1e-5
        tail_args = (*head[:3], inputs["key_bias"], inputs["img_ids"], inputs["txt_ids"], inputs["x"])
        tail = StepTailModel(model, LoweredFlux(model, blocks=(1, blocks)))
        x_next, residual = tail(*tail_args, inputs["sigma"], inputs["sigma_next"])
        step = StepModel(model)(*(inputs[k] for k in inputs))
    assert (x_next - step).abs().max().item() < 1e-5
    assert residual.shape == head[0].shape


def _optimised_kernels(path) -> collections.Counter:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(path.with_name("optimised.onnx"))
    options.intra_op_num_threads = 1
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(node.op_type for node in graph.node)


@pytest.mark.parametrize("rope", ROPE_FORMS)
def test_exported_step_graph_is_exact_and_small(model, rope, tmp_path):
    """The ONNX step graph in onnxruntime equals the torch step, and onnxruntime's optimiser leaves at most 350
    kernels of the nano step (diffusers' traced forward: 594 at S = 128; the lowered one: 253 with RotaryEmbedding,
    330 elementwise)."""
    options = ExportOptions(resolution=RESOLUTION, rope=rope)
    facts = ModelFacts.of(model, RESOLUTION)
    with single_thread():
        record = export_graph("step", model, tmp_path, options, facts=facts, progress=None)
    assert ("RotaryEmbedding" in record.op_counts) == (rope == "op")
    feeds = step_example_inputs(facts, 1, seed=5)
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    (x_next,) = session.run(None, feeds)
    with torch.no_grad(), float32_rope(model):
        reference = StepModel(model)(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    assert np.abs(x_next - reference).max() < 1e-5
    kernels = _optimised_kernels(tmp_path / "step.onnx")
    assert sum(kernels.values()) <= (260 if rope == "op" else 350), kernels
    assert kernels["Reshape"] < kernels["Gemm"] + 5 * kernels["Attention"], kernels  # no Reshape pair per Gemm


def test_dynamic_batch_graph_runs_every_batch(model, tmp_path):
    options = ExportOptions(resolution=RESOLUTION, batch="dynamic", max_batch=4)
    facts = ModelFacts.of(model, RESOLUTION)
    with single_thread():
        export_graph("step", model, tmp_path, options, facts=facts, progress=None)
    session = ort.InferenceSession(str(tmp_path / "step.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        feeds = step_example_inputs(facts, batch, seed=batch)
        (x_next,) = session.run(None, feeds)
        with torch.no_grad(), float32_rope(model):
            reference = StepModel(model)(*(torch.from_numpy(v) for v in feeds.values())).numpy()
        assert np.abs(x_next - reference).max() < 1e-5


def test_unknown_forms_are_refused(model):
    with pytest.raises(ValueError, match="rope form"):
        LoweredFlux(model, rope="complex")
    with pytest.raises(ValueError, match="attention form"):
        LoweredFlux(model, attention="plugin")
    with pytest.raises(ValueError, match="a range within"):
        LoweredFlux(model, blocks=(2, 2))


def test_a_block_range_carries_only_its_blocks_weights(model):
    """The step-cache head holds the first block's fused weights only, not every block's modulation."""
    whole, head = LoweredFlux(model), LoweredFlux(model, blocks=(0, 1))
    assert set(head.projections) == {"0", "0_context"}
    assert head.modulation.out is None and head.modulation_weight.shape[0] == 12 * head.dim
    assert whole.modulation_weight.shape[0] > 3 * head.modulation_weight.shape[0]
