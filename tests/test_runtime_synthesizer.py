"""DefectSynthesizer on a toy bundle: paste-back exactness, per-seed determinism, batching, progress, cancelling."""

from __future__ import annotations

import numpy as np
import pytest
from runtime_fixtures import StepOnlyBackend, make_toy_bundle, rewrite_manifest, sample_request_arrays

from unidg.core.schedule import flux_sigmas
from unidg.core.settings import UniDGSettings
from unidg.runtime.backends import GenerationCancelled, StepConditioning
from unidg.runtime.bundle import BundleError, load_bundle
from unidg.runtime.sampler import denoise, initial_noise, sampling_sigmas
from unidg.runtime.synthesizer import DefectSynthesizer, RequestError, SynthesisRequest


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    bundle = make_toy_bundle(tmp_path_factory.mktemp("b") / "toy", resolution=64)
    with DefectSynthesizer.from_bundle(bundle) as synthesizer:
        yield synthesizer


def _request(seed: int = 0, shape=(48, 40), **options) -> SynthesisRequest:
    return SynthesisRequest(*sample_request_arrays(shape, seed=seed % 7), seed=seed, **options)


@pytest.mark.parametrize("shape", [(48, 40), (30, 90), (97, 33), (64, 64), (200, 150)])
def test_pixels_outside_the_dilated_mask_are_the_source(synth, shape):
    request = _request(3, shape)
    result = synth.generate(request)
    assert result.image.shape == request.source.shape and result.image.dtype == np.uint8
    assert np.array_equal(result.image[~result.mask], request.source[~result.mask])
    assert result.mask[request.target_mask].all()  # the dilated mask covers the target mask
    assert result.mask.sum() > request.target_mask.sum()  # and grows it (7x7, 2 iterations)
    assert (result.image[result.mask] != request.source[result.mask]).any()  # something was generated


def test_mask_touching_the_border(synth):
    request = _request(1)
    mask = np.zeros_like(request.target_mask)
    mask[-5:, -7:] = True
    request = SynthesisRequest(request.reference, request.reference_mask, request.source, mask, seed=1)
    result = synth.generate(request)
    assert np.array_equal(result.image[~result.mask], request.source[~result.mask])


def test_same_seed_same_output_other_seed_other_output(synth):
    first, again = synth.generate(_request(5)), synth.generate(_request(5))
    assert np.array_equal(first.image, again.image) and np.array_equal(first.diptych, again.diptych)
    other = synth.generate(SynthesisRequest(*sample_request_arrays(seed=5), seed=6))
    assert not np.array_equal(first.diptych, other.diptych)


def test_noise_is_documented_numpy_normal_per_seed():
    noise = initial_noise([7, 8], 32)
    assert noise.dtype == np.float32 and noise.shape == (2, 32, 64)
    assert np.array_equal(noise[0], np.random.default_rng(7).standard_normal((32, 64), dtype=np.float32))
    assert np.array_equal(initial_noise([8], 32)[0], noise[1])  # a row does not depend on its batch


def test_batch_matches_one_by_one_and_keeps_order(synth):
    requests = [_request(i, shape) for i, shape in enumerate([(48, 40), (30, 90), (64, 64)])]
    batched = synth.generate_batch(requests)
    for request, result in zip(requests, batched):
        alone = synth.generate(request)
        assert result.image.shape == request.source.shape
        assert np.abs(result.diptych.astype(int) - alone.diptych.astype(int)).max() <= 1
        assert result.metadata["seed"] == request.seed and result.metadata["batch_size"] == 3


def test_static_batch_bundle_pads_and_splits(tmp_path, synth):
    static = make_toy_bundle(tmp_path / "static", resolution=64, batch=2)
    requests = [_request(i) for i in range(3)]
    with DefectSynthesizer.from_bundle(static) as two:
        assert two.batch_size == 2
        results = two.generate_batch(requests)
    assert [r.metadata["batch_size"] for r in results] == [2, 2, 1]
    for request, result in zip(requests, results):
        assert np.abs(result.diptych.astype(int) - synth.generate(request).diptych.astype(int)).max() <= 1


def test_requests_with_other_step_counts_run_in_their_own_batches(synth):
    requests = [_request(0, steps=4), _request(1, steps=9), _request(2, steps=4)]
    seen = []
    results = synth.generate_batch(requests, progress=lambda step, total: seen.append((step, total)))
    assert seen == [(i, 13) for i in range(1, 14)]  # 4 steps for the pair, then 9 for the single
    assert [r.metadata["steps"] for r in results] == [4, 9, 4]
    assert [r.metadata["batch_size"] for r in results] == [2, 1, 2]


def test_progress_callback_can_cancel(synth):
    seen = []

    def stop_at_five(step: int, total: int) -> bool:
        seen.append(step)
        return step < 5

    with pytest.raises(GenerationCancelled, match="after step 5/28"):
        synth.generate(_request(0), progress=stop_at_five)
    assert seen == [1, 2, 3, 4, 5]


def test_fewer_steps_change_the_result(synth):
    assert not np.array_equal(synth.generate(_request(0, steps=3)).diptych, synth.generate(_request(0)).diptych)


def test_metadata_names_seed_settings_bundle_and_timings(synth):
    metadata = synth.generate(_request(4, category="scratch", guidance=2.5)).metadata
    assert metadata["seed"] == 4 and metadata["steps"] == 28 and metadata["guidance"] == 2.5
    assert metadata["category"] == "scratch"
    assert metadata["bundle"]["fingerprint"] == synth.bundle.fingerprint
    assert metadata["settings"] == synth.settings.to_dict()
    assert set(metadata["timings_s"]) >= {"encode_images", "encode_reference", "denoise", "decode", "total"}
    assert metadata["backend"] == "onnxruntime"


@pytest.mark.parametrize(
    "options, words",
    [
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"guidance": float("inf")}, "guidance"),
        ({"guidance": "high"}, "guidance"),
        ({"category": "glitter"}, "category"),
    ],
)
def test_bad_options_are_refused_before_running(synth, options, words):
    with pytest.raises(ValueError, match=words):
        bad = SynthesisRequest(*sample_request_arrays(), **{"seed": 1, **options})
        synth.generate_batch([_request(0), bad], progress=lambda s, t: pytest.fail("ran"))


def test_options_error_type_names_the_request(synth):
    with pytest.raises(RequestError, match="job 7: steps"):
        synth.check(SynthesisRequest(*sample_request_arrays(), steps=0, name="job 7"))


def test_bundle_for_other_settings_is_refused(tmp_path):
    folder = make_toy_bundle(tmp_path / "toy", resolution=64)
    wanted = UniDGSettings(resolution=64, text_tokens=4, guidance=1.0, alpha=3.0)
    with pytest.raises(BundleError, match="other UniDG settings .*alpha: bundle 2.0 vs requested 3.0"):
        DefectSynthesizer.from_bundle(folder, settings=wanted)
    same = UniDGSettings(resolution=64, text_tokens=4, guidance=7.0, steps=10)  # sampling defaults may differ
    DefectSynthesizer.from_bundle(folder, settings=same).close()


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda m: m.update(context_tokens=99), "context_tokens 99"),
        (lambda m: m.update(batch=0), "'batch' is 0"),
        (lambda m: m.update(precision="fp4"), "unknown precision"),
        (lambda m: m["graphs"].pop("vae_decoder"), "lacks graphs ['vae_decoder']"),
        (lambda m: m["graphs"]["step"]["inputs"].pop("key_bias"), "lacks inputs ['key_bias']"),
        (lambda m: m["graphs"]["step"]["inputs"]["x"].update(dtype="float16"), "non-float32"),
        (lambda m: m.update(format="something-else"), "format is 'something-else'"),
        (lambda m: m["settings"].update(sharpness=3), "unknown UniDG settings"),
        (lambda m: m.update(text_tokens=5), "text_tokens 5"),
        (lambda m: m.update(fold_text_tokens=False), "fold_text_tokens"),
    ],
)
def test_inconsistent_manifests_are_refused(tmp_path, edit, words):
    folder = make_toy_bundle(tmp_path / "toy", resolution=64)
    rewrite_manifest(folder, edit)
    with pytest.raises(BundleError) as error:
        load_bundle(folder)
    assert words in str(error.value) and str(folder) in str(error.value)


def test_verify_false_skips_hashing_only(tmp_path):
    folder = make_toy_bundle(tmp_path / "toy", resolution=64)
    (folder / "notes.txt").write_text("x")  # unlisted files are ignored
    rewrite_manifest(folder, lambda m: None)
    (folder / "notes.txt").write_text("changed")
    with pytest.raises(BundleError, match="notes.txt"):
        load_bundle(folder)
    assert load_bundle(folder, verify=False).resolution == 64


class EulerCheck(StepOnlyBackend):
    """A numpy backend with v = x - target: the loop must reproduce x_N = target + prod(1 + dt_i) (x_0 - target)."""

    name = "euler-check"

    def step(self, x, conditioning, sigma, sigma_next):
        return x + np.float32(sigma_next - sigma) * (x - conditioning.cond[..., :64])


def test_sampler_walks_the_flux_schedule(tmp_path):
    bundle = load_bundle(make_toy_bundle(tmp_path / "toy", resolution=64))
    sigmas = sampling_sigmas(28, bundle.image_tokens)
    np.testing.assert_array_equal(sigmas, flux_sigmas(28, bundle.image_tokens))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 29
    target = np.random.default_rng(1).standard_normal((1, 32, 320), dtype=np.float32)
    conditioning = StepConditioning(target, None, None, None, None, None)
    noise = initial_noise([3], 32)
    x = denoise(EulerCheck(bundle), noise, conditioning, sigmas)
    factor = np.prod(1 + np.diff(sigmas.astype(np.float64)))
    np.testing.assert_allclose(x, target[..., :64] + factor * (noise - target[..., :64]), atol=1e-5)


def test_a_request_is_validated_once(synth, monkeypatch):
    """The synthesizer's check is the one validation of a request's arrays: generating a checked request, and
    building its diptych, trust it (the reference was validated five times on its way in before)."""
    from unidg.core import geometry, images

    calls = []
    original = images.validate_request

    def counting(*arrays):
        calls.append(1)
        return original(*arrays)

    monkeypatch.setattr(images, "validate_request", counting)
    monkeypatch.setattr(geometry, "validate_request", counting)
    monkeypatch.setattr(geometry, "validate_mask", lambda *a, **k: calls.append("reference mask"))
    request = synth.check(_request(steps=2))
    assert request.checked and calls == [1]
    assert synth.check(request) is request
    synth.generate(request)
    synth.generate_batch([request, request])
    assert calls == [1]
    synth.generate(_request(steps=2))  # an unchecked request is checked (once) on its way in
    assert calls == [1, 1]
