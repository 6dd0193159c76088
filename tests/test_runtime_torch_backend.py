"""torch backend: loads torch.export programs from a bundle and runs the same sampler as onnxruntime.

The programs here are the toy bundle's four formulas written in torch and exported with ``torch.export``; the test
checks the backend's loading, argument order, device residency across steps and batch handling against onnxruntime.
"""

from __future__ import annotations

import numpy as np
import pytest
from runtime_fixtures import make_toy_bundle, rewrite_manifest, sample_request_arrays, toy_weights

from unidg.runtime.backends import BackendError, BackendUnavailable, create_backend
from unidg.runtime.bundle import load_bundle
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest

torch = pytest.importorskip("torch")
nn = torch.nn
JOINT_DIM = 32


def _parameter(array: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.from_numpy(np.ascontiguousarray(array)), requires_grad=False)


class Step(nn.Module):
    def __init__(self, w: dict) -> None:
        super().__init__()
        self.wc, self.wx, self.wi = _parameter(w["Wc"]), _parameter(w["Wx"]), _parameter(w["Wi"])

    def forward(self, x, cond, ctx, key_bias, sigma, sigma_next, guidance, img_ids, txt_ids):
        v = x - cond @ self.wc - (ctx @ self.wx).mean(dim=1, keepdim=True)
        v = v - 0.1 * key_bias.mean(dim=1)[:, None, None] - 0.01 * guidance[:, None, None] - 0.001 * (img_ids @ self.wi)
        return x + (sigma_next - sigma)[:, None, None] * v


class Encoder(nn.Module):
    def __init__(self, w: dict) -> None:
        super().__init__()
        self.weight, self.bias = _parameter(w["W_enc"]), _parameter(w["B_enc"])

    def forward(self, pixels):
        return nn.functional.conv2d(nn.functional.avg_pool2d(pixels, 8), self.weight, self.bias)


class Decoder(nn.Module):
    def __init__(self, w: dict) -> None:
        super().__init__()
        self.weight = _parameter(w["W_dec"])

    def forward(self, latents):
        return torch.tanh(nn.functional.conv_transpose2d(latents, self.weight, stride=8))


class ImageEncoder(nn.Module):
    def __init__(self, w: dict, pool: int) -> None:
        super().__init__()
        self.weight, self.pool = _parameter(w["W_img"]), pool

    def forward(self, pixels):
        features = nn.functional.conv2d(nn.functional.avg_pool2d(pixels, self.pool), self.weight)
        return features.flatten(2).transpose(1, 2)


def _export(module: nn.Module, example: tuple, path) -> None:
    batch = torch.export.Dim("batch", min=1, max=16)
    shapes = tuple({0: batch} if arg.ndim > 0 and arg.shape[0] == 2 else None for arg in example)
    program = torch.export.export(module.eval(), example, dynamic_shapes=shapes)
    torch.export.save(program, str(path))


@pytest.fixture(scope="module")
def torch_bundle(tmp_path_factory):
    folder = make_toy_bundle(tmp_path_factory.mktemp("b") / "bundle", resolution=64, joint_dim=JOINT_DIM)
    meta = load_bundle(folder)
    w = toy_weights(JOINT_DIM)
    s, n, c, p = 64, meta.image_tokens, meta.context_tokens, meta.reference_size
    (folder / "torch").mkdir()
    b = 2
    z = torch.zeros
    _export(
        Step(w),
        (
            z(b, n, 64),
            z(b, n, 320),
            z(b, c, JOINT_DIM),
            z(b, c + n),
            z(b),
            z(b),
            z(b),
            z(n, 3),
            z(c, 3),
        ),
        folder / "torch" / "step.pt2",
    )
    _export(Encoder(w), (z(b, 3, s, 2 * s),), folder / "torch" / "vae_encoder.pt2")
    _export(Decoder(w), (z(b, 16, s // 8, s // 4),), folder / "torch" / "vae_decoder.pt2")
    _export(ImageEncoder(w, p // 4), (z(b, 3, p, p),), folder / "torch" / "image_encoder.pt2")
    rewrite_manifest(folder, lambda meta: None)  # hash the programs into the manifest
    return folder


def test_torch_programs_match_onnxruntime(torch_bundle):
    requests = [SynthesisRequest(*sample_request_arrays(seed=i), seed=10 + i) for i in range(3)]
    with DefectSynthesizer.from_bundle(torch_bundle) as synth:
        expected = synth.generate_batch(requests)
    seen = []
    with DefectSynthesizer.from_bundle(torch_bundle, backend="torch") as synth:
        assert synth.backend.name == "torch"
        results = synth.generate_batch(requests, progress=lambda step, total: seen.append((step, total)))
    assert seen[-1] == (28, 28)
    for got, want, request in zip(results, expected, requests):
        assert np.abs(got.diptych.astype(int) - want.diptych.astype(int)).max() <= 1
        assert np.array_equal(got.image[~got.mask], request.source[~got.mask])
        assert not np.array_equal(got.image, request.source)


def test_step_keeps_state_on_the_device_and_reuploads_foreign_x(torch_bundle):
    bundle = load_bundle(torch_bundle)
    onnx_backend = create_backend("onnxruntime", bundle)
    torch_backend = create_backend("torch", bundle)
    rng = np.random.default_rng(0)
    from unidg.runtime.backends import StepConditioning

    n, c = bundle.image_tokens, bundle.context_tokens
    conditioning = StepConditioning(
        cond=rng.standard_normal((1, n, 320), dtype=np.float32),
        ctx=rng.standard_normal((1, c, JOINT_DIM), dtype=np.float32),
        key_bias=np.zeros((1, c + n), np.float32),
        guidance=np.ones(1, np.float32),
        img_ids=np.zeros((n, 3), np.float32),
        txt_ids=np.zeros((c, 3), np.float32),
    )
    x = rng.standard_normal((1, n, 64), dtype=np.float32)
    a = torch_backend.step(x, conditioning, 1.0, 0.5)
    b = torch_backend.step(a, conditioning, 0.5, 0.25)  # resident path
    foreign = b.copy()
    c_ = torch_backend.step(foreign, conditioning, 0.25, 0.0)  # uploaded path
    ref = onnx_backend.step(
        onnx_backend.step(onnx_backend.step(x, conditioning, 1.0, 0.5), conditioning, 0.5, 0.25),
        conditioning,
        0.25,
        0.0,
    )
    np.testing.assert_allclose(c_, ref, atol=1e-5)


def test_bundle_without_programs_is_refused(tmp_path):
    bundle = load_bundle(make_toy_bundle(tmp_path / "plain"))
    with pytest.raises(BackendError, match="no torch exported programs"):
        create_backend("torch", bundle)


def test_cuda_device_without_gpu_is_refused(torch_bundle):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        create_backend("torch", load_bundle(torch_bundle), device="cuda")


# ----------------------------------------------------------------------------------- speed options (--compile ...)
class AttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj_out = nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, h, key_bias):
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(h).chunk(3, dim=-1))
        mask = key_bias[:, None, None, :].to(q.dtype)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return h + self.proj_out(out.transpose(1, 2).flatten(2))


class AttentionStep(nn.Module):
    """A step program shaped like the real one: embedders, per-sample modulation, biased attention blocks, proj_out."""

    WIDTH, HEADS = 64, 2

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        width = self.WIDTH
        self.x_embedder, self.context_embedder = nn.Linear(64 + 320, width), nn.Linear(JOINT_DIM, width)
        self.modulation = nn.Linear(16, width)  # one row per sample, like AdaLN
        self.blocks = nn.ModuleList(AttentionBlock(width, self.HEADS) for _ in range(2))
        self.proj_out = nn.Linear(width, 64)

    def forward(self, x, cond, ctx, key_bias, sigma, sigma_next, guidance, img_ids, txt_ids):
        shift = self.modulation(torch.cat([sigma[:, None], guidance[:, None]], dim=1).repeat(1, 8))
        h = torch.cat([self.context_embedder(ctx), self.x_embedder(torch.cat([x, cond], dim=-1))], dim=1)
        h = h + shift[:, None, :] + 0.01 * torch.cat([txt_ids, img_ids], dim=0).sum(-1)[None, :, None]
        for block in self.blocks:
            h = block(h, key_bias)
        v = self.proj_out(h[:, ctx.shape[1] :])
        return x + (sigma_next - sigma)[:, None, None] * v


@pytest.fixture(scope="module")
def attention_bundle(tmp_path_factory, torch_bundle):
    """The torch bundle with a step program that has linear layers and biased SDPA (what the options rewrite)."""
    import shutil

    folder = tmp_path_factory.mktemp("attention") / "bundle"
    shutil.copytree(torch_bundle, folder)
    meta = load_bundle(folder)
    b, n, c = 2, meta.image_tokens, meta.context_tokens
    z = torch.zeros
    example = (z(b, n, 64), z(b, n, 320), z(b, c, JOINT_DIM), z(b, c + n), z(b), z(b), z(b), z(n, 3), z(c, 3))
    _export(AttentionStep(), example, folder / "torch" / "step.pt2")
    rewrite_manifest(folder, lambda meta: None)
    return folder


def _step_inputs(bundle, batch: int = 2, seed: int = 0) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    n, c = bundle.image_tokens, bundle.context_tokens
    key_bias = torch.zeros(batch, c + n)
    key_bias[:, 0] = np.log(4.0)
    key_bias[:, c + 3 : c + 9] = np.log(2.0)
    return (
        torch.randn(batch, n, 64, generator=gen),
        torch.randn(batch, n, 320, generator=gen),
        torch.randn(batch, c, JOINT_DIM, generator=gen),
        key_bias,
        torch.full((batch,), 0.8),
        torch.full((batch,), 0.7),
        torch.ones(batch),
        torch.randn(n, 3, generator=gen),
        torch.zeros(c, 3),
    )


def _velocity(program, inputs) -> torch.Tensor:
    with torch.inference_mode():
        out = program(*inputs)
    out = out[0] if isinstance(out, tuple | list) else out
    return (out - inputs[0]) / (inputs[5] - inputs[4])[:, None, None]


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_fp8_linear_matches_fp32_within_e4m3_rounding():
    from unidg.runtime.backends.torch_step_options import fp8_linear, fp8_quantize

    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 128, generator=gen), torch.randn(96, generator=gen)
    weight_fp8, scale = fp8_quantize(weight)
    assert weight_fp8.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    for rows in (40, 3):  # padded scaled-matmul path (40 is not a multiple of 16) and the weight-only path
        x = torch.randn(rows, 128, generator=gen)
        want = nn.functional.linear(x, weight, bias)
        got = fp8_linear(x, weight_fp8, scale, bias)
        assert got.shape == want.shape
        error = _relative_error(got, want)
        # E4M3 keeps 3 mantissa bits (relative rounding <= 1/16 per value); over a 128-long dot product the errors
        # average out: stated bound 5 % (relative Frobenius error), and it must not be exact (it did quantize).
        assert 1e-4 < error < 0.05, (rows, error)


def test_fp8_modules_keep_no_autograd_graph_and_free_the_high_precision_weights():
    """Quantizing parameters that require grad must not record an autograd graph: one would keep the bf16 weight and
    a float32 copy alive beside the FP8 one (a full FLUX transformer measured 79 GiB instead of ~13)."""
    import gc
    import weakref

    from unidg.runtime.backends.torch_step_options import quantize_linear_modules

    model = nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 48))
    assert all(p.requires_grad for p in model.parameters())
    old_weights = [weakref.ref(model[0].weight), weakref.ref(model[2].weight)]
    assert quantize_linear_modules(model) == ["0", "2"]
    for layer in (model[0], model[2]):
        assert layer.weight_fp8.grad_fn is None and not layer.weight_fp8.requires_grad
        assert layer.weight_scale.grad_fn is None and not layer.weight_scale.requires_grad
    gc.collect()
    assert [ref() for ref in old_weights] == [None, None]


def test_the_cuda_scaled_mm_call_agrees_with_the_cpu_emulation():
    """The exact torch._scaled_mm call of the CUDA path, run by torch's CPU kernel, against the float32 emulation."""
    from unidg.runtime.backends.torch_step_options import fp8_quantize, scaled_mm_rowwise

    gen = torch.Generator().manual_seed(1)
    x_fp8, x_scale = fp8_quantize(torch.randn(48, 64, generator=gen).bfloat16())
    w_fp8, w_scale = fp8_quantize(torch.randn(32, 64, generator=gen).bfloat16())
    try:
        got = scaled_mm_rowwise(x_fp8, x_scale, w_fp8, w_scale)
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"this torch build has no CPU torch._scaled_mm ({error})")
    emulated = (x_fp8.float() @ w_fp8.float().t()) * (x_scale * w_scale.t())
    assert got.shape == (48, 32) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), emulated, rtol=8e-3, atol=1e-2)  # bf16 output rounding


def test_fp8_rewrite_quantizes_the_blocks_and_keeps_embedders_and_proj_out(attention_bundle):
    from unidg.runtime.backends.torch_step_options import fp8_keeps_precision, quantize_graph_linears

    assert fp8_keeps_precision("proj_out.weight") and fp8_keeps_precision("transformer.proj_out.weight")
    assert not fp8_keeps_precision("single_transformer_blocks.3.proj_out.weight")
    assert fp8_keeps_precision("time_text_embed.timestep_embedder.linear_1.weight")
    bundle = load_bundle(attention_bundle)
    program = torch.export.load(str(attention_bundle / "torch" / "step.pt2")).module()
    inputs = _step_inputs(bundle)
    want = _velocity(program, inputs)
    replaced = quantize_graph_linears(program)
    assert sorted(replaced) == [
        "blocks.0.proj_out.weight",
        "blocks.0.qkv.weight",
        "blocks.1.proj_out.weight",
        "blocks.1.qkv.weight",
        "modulation.weight",
    ]
    names = dict(program.named_parameters()) | dict(program.named_buffers())
    assert "blocks.0.qkv.weight" not in names and "proj_out.weight" in names  # high-precision copies dropped
    assert names["fp8_blocks_0_qkv_weight_weight"].dtype == torch.float8_e4m3fn
    error = _relative_error(_velocity(program, inputs), want)
    assert 1e-4 < error < 0.08, error  # stated bound for the FP8 step: 8 % relative error of the velocity


def test_compiled_step_equals_eager(attention_bundle):
    bundle = load_bundle(attention_bundle)
    eager = create_backend("torch", bundle)
    compiled = create_backend("torch", bundle, compile=True)
    assert compiled.optimizations == {"compiled": True}
    inputs = _step_inputs(bundle)
    # torch.compile (inductor, CPU) reorders float32 reductions: stated tolerance 1e-5 absolute on the velocity
    torch.testing.assert_close(
        _velocity(compiled.programs["step"], inputs), _velocity(eager.programs["step"], inputs), atol=1e-5, rtol=1e-5
    )


def test_cuda_graph_loop_on_cpu_equals_the_step_loop_and_is_deterministic(attention_bundle):
    requests = [SynthesisRequest(*sample_request_arrays(seed=i), seed=5 + i, steps=4) for i in range(2)]
    with DefectSynthesizer.from_bundle(attention_bundle, backend="torch") as synth:
        expected = synth.generate_batch(requests)
    with DefectSynthesizer.from_bundle(attention_bundle, backend="torch", cuda_graph=True, fp8=True) as synth:
        loop = synth.backend._loop
        seen = []
        first = synth.generate_batch(requests, progress=lambda step, total: seen.append((step, total)))
        again = synth.generate_batch(requests)
        other = synth.generate(requests[0])  # batch 1: a new input shape, new static buffers
        assert not loop.captured  # CPU: the wrapper runs the loop on its static buffers, no capture
    assert seen == [(i, 4) for i in range(1, 5)]
    for a, b in zip(first, again):
        assert np.array_equal(a.image, b.image)  # same seed, same bytes
    assert np.array_equal(other.image, first[0].image)
    with DefectSynthesizer.from_bundle(attention_bundle, backend="torch", cuda_graph=True) as synth:
        plain_loop = synth.generate_batch(requests)
    for a, b in zip(plain_loop, expected):
        assert np.abs(a.diptych.astype(int) - b.diptych.astype(int)).max() <= 1  # the captured-loop path, exact math
    for a, b in zip(first, expected):  # FP8 moves the picture a little, not a lot
        assert np.abs(a.diptych.astype(float) - b.diptych.astype(float)).mean() < 8.0


def test_graph_runner_copies_new_inputs_into_its_static_buffers():
    from unidg.runtime.backends.torch_step_options import GraphRunner

    runner = GraphRunner(lambda a, b: a * 2 + b, torch.device("cpu"))
    assert torch.equal(runner(torch.ones(3), torch.zeros(3)), torch.full((3,), 2.0))
    assert torch.equal(runner(torch.full((3,), 5.0), torch.ones(3)), torch.full((3,), 11.0))
    assert torch.equal(runner(torch.ones(2), torch.ones(2)), torch.full((2,), 3.0))


FUSED_SCRIPT = r"""
import sys, torch
from unidg.runtime.backends import create_backend
from unidg.runtime.bundle import load_bundle
sys.path.insert(0, sys.argv[2])
from test_runtime_torch_backend import _step_inputs, _velocity

bundle = load_bundle(sys.argv[1])
plain = create_backend("torch", bundle)
fused = create_backend("torch", bundle, fused_attention=True)
assert fused.optimizations == {"fused_attention_calls": 2}, fused.optimizations
inputs = _step_inputs(bundle)
want, got = _velocity(plain.programs["step"], inputs), _velocity(fused.programs["step"], inputs)
print("max_abs", float((got - want).abs().max()))
torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
compiled = create_backend("torch", bundle, fused_attention=True, fp8=True, compile=True)
got = _velocity(compiled.programs["step"], inputs)
print("fp8_compiled_rel", float((got - want).norm() / want.norm()))
assert float((got - want).norm() / want.norm()) < 0.08
"""


def test_fused_attention_runs_the_triton_kernel_in_the_step(attention_bundle, tmp_path):
    """Triton's interpreter needs TRITON_INTERPRET=1 before triton's first import: a fresh process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", FUSED_SCRIPT, str(attention_bundle), str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "max_abs" in result.stdout and "fp8_compiled_rel" in result.stdout


def test_fused_attention_without_the_interpreter_is_refused_on_cpu(attention_bundle):
    pytest.importorskip("triton")
    from unidg.runtime.attention_kernel import interpreter_available

    if interpreter_available():
        pytest.skip("this process imported triton with TRITON_INTERPRET=1")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        create_backend("torch", load_bundle(attention_bundle), fused_attention=True)


def test_speed_options_belong_to_the_torch_backend():
    import argparse

    from unidg.runtime.cli_options import add_backend_options, backend_options

    parser = argparse.ArgumentParser()
    add_backend_options(parser)
    args = parser.parse_args(["--backend", "torch", "--device", "cuda", "--compile", "--fp8", "--cuda-graph"])
    assert backend_options(args) == {
        "device": "cuda",
        "cuda_graph": True,
        "compile": True,
        "fp8": True,
        "fused_attention": False,
    }
    with pytest.raises(ValueError, match="--fp8, --fused-attention: torch backend options"):
        backend_options(parser.parse_args(["--fp8", "--fused-attention"]))


def test_generate_command_runs_the_torch_backend_with_speed_options(attention_bundle, tmp_path, capsys):
    """`unidg generate --backend torch --fp8 --cuda-graph` (CPU here: FP8 emulated, the loop wrapper uncaptured);
    the same command twice gives the same bytes."""
    from PIL import Image
    from runtime_fixtures import write_sample_files

    from unidg.cli import main

    files = write_sample_files(tmp_path, "case", seed=3)
    images = []
    for run in ("a", "b"):
        out = tmp_path / run
        args = ["generate", "--bundle", str(attention_bundle), "--out", str(out), "--seed", "7", "--steps", "3"]
        args += ["--backend", "torch", "--device", "cpu", "--fp8", "--cuda-graph"]
        args += ["--reference", str(files["reference"]), "--reference-mask", str(files["reference_mask"])]
        args += ["--source", str(files["source"]), "--mask", str(files["mask"])]
        assert main(args) == 0, capsys.readouterr().err
        (abnormal,) = (out / "abnormal").iterdir()
        images.append(np.asarray(Image.open(abnormal)))
    assert np.array_equal(images[0], images[1])
