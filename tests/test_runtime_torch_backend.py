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
