"""Step caching (docs/step-cache.md): the decision, its bad inputs, the bundle's cache data, the ONNX form against the
torch form, cache off bit for bit the uncached sampler, static runs deterministic per seed, and the gate's refusal.

The shipped UniDG-nano bundle carries the step-cache graphs and a gated setting, so nothing here exports a graph.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime_fixtures import StepOnlyBackend

import unidg.runtime.bundle as bundle_module
import unidg.runtime.demo as demo
from unidg.cli import main
from unidg.core.manifest import write_manifest
from unidg.core.weights_folder import read_weights
from unidg.export.cache_calibrate import CacheGateError, cache_calibrate
from unidg.runtime import sampler as runtime_sampler
from unidg.runtime.backends.base import BackendError, StepConditioning
from unidg.runtime.bundle import BundleError, load_bundle
from unidg.runtime.sampler import sampling_sigmas
from unidg.runtime.step_cache import (
    CacheDecider,
    StepCache,
    StepCacheError,
    bundle_step_cache,
    check_schedule,
    check_threshold,
    relative_l1,
)
from unidg.runtime.synthesizer import DefectSynthesizer, RequestError, SynthesisRequest
from unidg.train.loading import load_weights_model
from unidg.train.sampler import decode, denoise_cached, get_noise, prepare_diptych
from unidg.train.split_transformer import transformer_head, transformer_tail, velocity_out

SHIPPED = demo.DEFAULT_BUNDLE
WEIGHTS = demo.DEFAULT_BUNDLE.parent / "unidg-nano"
STEPS = 28


def _request(seed: int = 0, steps: int | None = None) -> SynthesisRequest:
    case = demo.read_samples(demo.DEFAULT_SAMPLES)[0]
    return SynthesisRequest.from_files(
        case.reference, case.reference_mask, case.source, case.mask, seed=seed, steps=steps
    )


def _plain_bundle(tmp_path: Path) -> Path:
    """The shipped bundle without its step-cache data, as `unidg export onnx` writes it (format_version 1)."""
    shipped = load_bundle(SHIPPED)
    out = tmp_path / "plain"
    out.mkdir()
    metadata = {k: v for k, v in shipped.metadata.items() if k != "step_cache"}
    metadata["format_version"] = 1
    for spec in shipped.graphs.values():
        shutil.copy2(shipped.path / spec.file, out / spec.file)
    write_manifest(out, "bundle", metadata)
    return out


# --------------------------------------------------------------------------------------------------- the decision
def test_relative_l1_is_the_largest_per_sample_change():
    reference = np.ones((2, 3, 4), np.float32)
    current = reference.copy()
    current[1] *= 1.25
    assert relative_l1(current, reference) == pytest.approx(0.25)
    assert relative_l1(reference, reference) == 0.0


def test_dynamic_computes_step_0_then_compares_with_the_last_full_step():
    decider = CacheDecider(StepCache("dynamic", threshold=0.1), steps=4)
    base = np.ones((1, 2, 2))
    assert decider.full_step(0, base)
    assert not decider.full_step(1, base * 1.05)  # 5 % < 10 %
    assert not decider.full_step(2, base * 1.09)  # still against step 0, not step 1
    assert decider.full_step(3, base * 1.10)  # reaches the threshold
    assert decider.report()["ran"] == [1, 0, 0, 1] and decider.full_steps == 2


def test_static_follows_its_schedule_whatever_the_signal():
    schedule = [1, 0, 1, 0]
    decider = CacheDecider(StepCache("static", schedule=schedule), steps=4)
    assert [decider.full_step(i, None) for i in range(4)] == [True, False, True, False]


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, "0.1", True])
def test_a_threshold_that_is_not_a_positive_number_is_refused(bad):
    with pytest.raises(StepCacheError, match="threshold"):
        check_threshold(bad)
    with pytest.raises(StepCacheError):
        StepCache("dynamic", threshold=bad)


def test_schedules_that_skip_step_0_or_miss_steps_are_refused():
    with pytest.raises(StepCacheError, match="skips the first step"):
        check_schedule([0] + [1] * 27, STEPS)
    with pytest.raises(StepCacheError, match="27 entries for 28 steps"):
        check_schedule([1] * 27, STEPS)
    with pytest.raises(StepCacheError, match="other than 0"):
        check_schedule([1, 2, 1], 3)
    with pytest.raises(StepCacheError, match="3 entries for 4 steps"):
        CacheDecider(StepCache("static", schedule=[1, 0, 1]), steps=4)
    with pytest.raises(StepCacheError, match="choose one of"):
        StepCache("sometimes")


# ---------------------------------------------------------------------------------------------- bundles and versions
def test_the_shipped_bundle_records_a_gated_static_schedule():
    bundle = load_bundle(SHIPPED)
    gate = bundle.step_cache["gate"]
    assert bundle.metadata["format_version"] == 2 and set(bundle.cache_graphs) == {
        "step_head",
        "step_tail",
        "step_cached",
    }
    assert gate["default"] == "static"
    schedule = check_schedule(gate["static"]["schedule"], STEPS)
    assert sum(schedule) <= 0.6 * STEPS, "the gated schedule saves less than 40 % of the evaluations"
    chosen = next(row for row in gate["table"] if row["name"] == gate["static"]["name"])
    assert chosen["passed"] and chosen["defect_psnr_min"] >= gate["min_defect_psnr"] >= 30.0
    assert bundle_step_cache(bundle) == StepCache("static", schedule=schedule)


def test_a_bundle_without_cache_data_runs_off_and_refuses_a_cached_run(tmp_path):
    plain = load_bundle(_plain_bundle(tmp_path))
    assert plain.cache_graphs == {} and bundle_step_cache(plain).mode == "off"
    for mode in ("static", "dynamic"):
        with pytest.raises(StepCacheError, match="no step-cache data.*cache-graphs"):
            bundle_step_cache(plain, mode, 0.08 if mode == "dynamic" else None)


def test_a_cached_bundle_read_by_a_runtime_of_format_1_is_refused_by_its_version(monkeypatch):
    monkeypatch.setattr(bundle_module, "READABLE_FORMAT_VERSIONS", (1,))
    with pytest.raises(BundleError, match="format_version 2 is not supported"):
        load_bundle(SHIPPED, verify=False)


def test_a_step_cache_table_in_a_format_1_manifest_is_refused(tmp_path):
    out = tmp_path / "mislabelled"
    shutil.copytree(SHIPPED, out)
    manifest = json.loads((out / "manifest.json").read_text())
    metadata = {**manifest["metadata"], "format_version": 1}
    write_manifest(out, "bundle", metadata)
    with pytest.raises(BundleError, match="'step_cache' table but format_version 1"):
        load_bundle(out, verify=False)


# ------------------------------------------------------------------------------------------------ running the bundle
@pytest.fixture(scope="module")
def synthesizers():
    made = {}

    def get(**options):
        key = tuple(sorted(options.items()))
        if key not in made:
            made[key] = DefectSynthesizer.from_bundle(SHIPPED, threads=1, **options)
        return made[key]

    yield get
    for synth in made.values():
        synth.close()


def test_cache_off_is_bit_for_bit_the_bundle_without_cache_data(tmp_path, synthesizers):
    with DefectSynthesizer.from_bundle(_plain_bundle(tmp_path), threads=1) as plain:
        want = plain.generate(_request(seed=3))
    got = synthesizers(cache="off").generate(_request(seed=3))
    assert np.array_equal(got.image, want.image) and np.array_equal(got.diptych, want.diptych)
    assert got.metadata["step_cache"]["mode"] == "off" and got.metadata["step_cache"]["full_steps"] == STEPS


def test_static_runs_are_deterministic_per_seed_and_save_evaluations(synthesizers):
    synth = synthesizers()  # the bundle's gated default: static
    first, again, other = (synth.generate(_request(seed=s)) for s in (5, 5, 6))
    report = first.metadata["step_cache"]
    assert report["mode"] == "static" and report["full_steps"] <= 0.6 * STEPS
    assert np.array_equal(first.image, again.image)
    assert not np.array_equal(first.image, other.image)


def test_a_default_schedule_turns_off_for_other_step_counts_and_a_chosen_one_refuses_them(synthesizers):
    assert synthesizers().generate(_request(steps=2)).metadata["step_cache"]["mode"] == "off"
    with pytest.raises(RequestError, match="has 28 entries for 2 steps") as caught:
        synthesizers(cache="static").generate(_request(steps=2))
    assert caught.value.option == "steps"


@pytest.fixture()
def one_torch_thread():
    """The nano's tiny matmuls gain nothing from threads; on a busy machine they lose a lot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_onnx_form_equals_the_torch_form(synthesizers, one_torch_thread):
    model = load_weights_model(read_weights(WEIGHTS))
    request = _request(seed=2)
    diptych = model.settings.diptych(request.reference, request.reference_mask, request.source, request.target_mask)
    inputs = prepare_diptych(model, diptych)
    # the split forward is the transformer's forward, exactly
    x = get_noise([2], inputs.image_tokens)
    with torch.no_grad():
        whole = model.velocity(x, inputs.cond, inputs.ctx, inputs.key_bias, 0.7, 1.0, inputs.img_ids, inputs.txt_ids)
        head = transformer_head(model, x, inputs.cond, inputs.ctx, inputs.key_bias, 0.7, 1.0, inputs.img_ids,
                                inputs.txt_ids)  # fmt: skip
        split = velocity_out(model, transformer_tail(model, head, inputs.key_bias), head.temb)
    assert torch.equal(whole, split)

    sigmas = sampling_sigmas(STEPS, inputs.image_tokens)
    guidance = model.settings.guidance
    conditioning = StepConditioning(
        cond=inputs.cond.numpy(),
        ctx=inputs.ctx.numpy(),
        key_bias=inputs.key_bias.numpy(),
        guidance=np.array([guidance], np.float32),
        img_ids=inputs.img_ids.numpy(),
        txt_ids=inputs.txt_ids.numpy(),
    )
    backend = synthesizers().backend
    for cache in (bundle_step_cache(backend.bundle, "static"), StepCache("dynamic", threshold=0.08)):
        x_onnx, ran_onnx = runtime_sampler.denoise_cached(backend, x.numpy(), conditioning, sigmas, cache)
        x_torch, ran_torch = denoise_cached(model, x, inputs, sigmas.tolist(), guidance, cache)
        assert ran_onnx.decisions == ran_torch.decisions and ran_onnx.full_steps < STEPS, cache
        difference = float(np.abs(x_onnx - x_torch.numpy()).max())
        assert difference < 1e-3, f"{cache}: torch and ONNX forms differ by {difference:.2e} in the final latents"
    torch_diptych = decode(model, x_torch, inputs)[0]  # and the picture is the same to the 8-bit level
    onnx_diptych = decode(model, torch.from_numpy(x_onnx), inputs)[0]
    assert np.abs(torch_diptych.astype(int) - onnx_diptych.astype(int)).max() <= 1


def test_a_backend_without_the_cache_graphs_refuses_cached_steps_by_name():
    backend = StepOnlyBackend(load_bundle(SHIPPED, verify=False))
    with pytest.raises(BackendError, match="step-only backend does not run step caching"):
        backend.step_head(np.zeros((1, 2, 64), np.float32), None, 1.0)


# ------------------------------------------------------------------------------------------------------ the surfaces
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cache-threshold", "nan"], "finite number > 0"),
        (["--cache-threshold", "0"], "finite number > 0"),
        (["--cache", "static", "--cache-threshold", "0.1"], "applies to --cache dynamic"),
    ],
)
def test_generate_refuses_bad_cache_options_in_one_line(tmp_path, capsys, flags, message):
    case = demo.read_samples(demo.DEFAULT_SAMPLES)[0]
    argv = [
        "generate",
        "--bundle", str(SHIPPED), "--reference", str(case.reference), "--reference-mask", str(case.reference_mask),
        "--source", str(case.source), "--mask", str(case.mask), "--out", str(tmp_path / "out"), *flags,
    ]  # fmt: skip
    assert main(argv) != 0
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------- the gate
def test_the_gate_refuses_a_failing_setting_by_name(tmp_path, one_torch_thread):
    calib = tmp_path / "calib"
    udg = tmp_path / "udg"
    assert main(["data", "synth", "--out", str(udg), "--count", "2", "--seed", "4", "--size", "96", "--quiet"]) == 0
    build = ["calib", "build", "--data", str(udg), "--weights", str(WEIGHTS), "--out", str(calib)]
    assert main([*build, "--samples", "2", "--held-out", "1", "--step-subset", "0"]) == 0
    with pytest.raises(CacheGateError, match=r"\['dynamic:5'\] fail the gate") as caught:
        cache_calibrate(SHIPPED, calib, tmp_path / "out", thresholds=(), settings=["dynamic:5"], threads=1)
    (row,) = caught.value.table
    assert row["full_steps_mean"] == 1 and not row["passed"]
    assert not (tmp_path / "out").exists()


def test_bench_cache_puts_the_stock_diffusers_pipeline_beside_the_cache_modes(tmp_path, capsys) -> None:
    """One interleaved round over the shipped bundle: off / static / dynamic / stock diffusers; the stock pipeline runs
    the uncached 28 steps on the same noise, so its image equals the runtime's uncached one to float noise."""
    from unidg.cli import main

    out = tmp_path / "cache.json"
    args = ["bench", "cache", "--requests", "1", "--repeats", "1", "--threads", "1", "--vs-diffusers"]
    assert main([*args, "--json", str(out)]) == 0
    rows = {row["mode"]: row for row in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["off", "static", "dynamic", "diffusers"]
    assert rows["off"]["evaluations_per_sample"] == rows["diffusers"]["evaluations_per_sample"] == 28
    assert rows["static"]["evaluations_per_sample"] < 28
    assert rows["diffusers"]["median_denoise_s"] is None  # the stock pipeline times only the whole call
    assert rows["diffusers"]["defect_psnr_min_db"] > 45  # the same sample, up to float noise
    assert "diffusers" in capsys.readouterr().out
