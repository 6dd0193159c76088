"""Step caching on the torch backend (docs/step-cache.md): `unidg export cache-graphs` on a bundle with torch programs
adds the three step-cache programs; the torch backend runs the static schedule and the dynamic threshold through them
with the onnxruntime backend's decisions and results; `--cache off` runs the unchanged step program bit for bit.

The bundle: the shipped UniDG-nano weights exported at the shipped resolution with `--torch-programs`, then
`unidg export cache-graphs`, with the shipped bundle's gate record (calibrated on the same weights) copied in.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import numpy as np
import pytest
from export_fixtures import single_thread, workspace

import unidg.runtime.demo as demo
import unidg.runtime.synthesizer as synthesizer_module
from unidg.cli import main
from unidg.core.manifest import read_manifest, write_manifest
from unidg.runtime.bundle import CACHE_GRAPH_NAMES, GRAPH_NAMES, load_bundle
from unidg.runtime.step_cache import StepCacheError
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest

WEIGHTS = demo.DEFAULT_BUNDLE.parent / "unidg-nano"
STEPS = 28
# Final latents, torch programs vs onnxruntime graphs, both float32 on the CPU, 28 steps, seed 5: measured max |diff|
# 2.9e-5 on sample case 0 (static and dynamic), at most 3.6e-5 over the six sample cases (reductions ordered
# differently on each side); the decoded diptychs at most one 8-bit level apart.
LATENT_ATOL = 2e-4


@functools.cache
def bundles() -> tuple[Path, Path]:
    """(format-1 bundle with the four torch programs, format-2 bundle with the seven and the shipped gate)."""
    plain, cached = workspace() / "programs", workspace() / "programs-cached"
    resolution = str(load_bundle(demo.DEFAULT_BUNDLE, verify=False).resolution)
    with single_thread():
        export = ["export", "onnx", "--weights", str(WEIGHTS), "--out", str(plain), "--resolution", resolution]
        assert main([*export, "--torch-programs"]) == 0
        graphs = ["export", "cache-graphs", "--bundle", str(plain), "--weights", str(WEIGHTS), "--out", str(cached)]
        assert main(graphs) == 0
    metadata = dict(read_manifest(cached, kind="bundle").metadata)
    gate = load_bundle(demo.DEFAULT_BUNDLE, verify=False).step_cache["gate"]
    metadata["step_cache"] = {**metadata["step_cache"], "gate": gate}
    write_manifest(cached, "bundle", metadata)
    return plain, cached


def _request(seed: int) -> SynthesisRequest:
    case = demo.read_samples(demo.DEFAULT_SAMPLES)[0]
    return SynthesisRequest.from_files(case.reference, case.reference_mask, case.source, case.mask, seed=seed)


def _spy_on_cached_latents(monkeypatch) -> dict:
    """Keep (as ``["x"]``) the final latents the cached sampler returns: a spy that calls the real sampler."""
    kept = {}
    real = synthesizer_module.denoise_cached

    def spy(*args, **kwargs):
        x, decider = real(*args, **kwargs)
        kept["x"] = x.copy()
        return x, decider

    monkeypatch.setattr(synthesizer_module, "denoise_cached", spy)
    return kept


def _generate(bundle: Path, backend: str, seed: int, monkeypatch=None, **options):
    """One result, and with ``monkeypatch`` the final latents the cached sampler returned."""
    kept = _spy_on_cached_latents(monkeypatch) if monkeypatch is not None else {}
    if backend == "onnxruntime":
        options["threads"] = 1
    with single_thread(), DefectSynthesizer.from_bundle(bundle, backend, **options) as synth:
        result = synth.generate(_request(seed))
    return result, kept.get("x")


def test_cache_graphs_adds_torch_programs_and_keeps_the_step_program():
    plain, cached = bundles()
    table = load_bundle(cached).metadata["torch_programs"]  # checks the sha256 of every listed file
    assert table == {name: f"torch/{name}.pt2" for name in (*GRAPH_NAMES, *CACHE_GRAPH_NAMES)}
    before, after = read_manifest(plain, kind="bundle").files, read_manifest(cached, kind="bundle").files
    assert all(after[f"torch/{name}.pt2"] == before[f"torch/{name}.pt2"] for name in GRAPH_NAMES)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_torch_cached_equals_onnxruntime_cached(cache, monkeypatch):
    _, cached = bundles()
    got, x_torch = _generate(cached, "torch", 5, monkeypatch, cache=cache)
    want, x_onnx = _generate(cached, "onnxruntime", 5, monkeypatch, cache=cache)
    report = got.metadata["step_cache"]
    assert report["mode"] == cache and report["full_steps"] < STEPS
    assert report["ran"] == want.metadata["step_cache"]["ran"]  # the same steps ran in full
    difference = float(np.abs(x_torch - x_onnx).max())
    assert difference <= LATENT_ATOL, f"{cache}: final latents differ by {difference:.2e}"
    assert np.abs(got.diptych.astype(int) - want.diptych.astype(int)).max() <= 1


def test_torch_static_runs_are_deterministic_per_seed():
    _, cached = bundles()
    first, again, other = (_generate(cached, "torch", seed)[0] for seed in (5, 5, 6))
    assert first.metadata["step_cache"]["mode"] == "static"  # the bundle's gated default
    assert np.array_equal(first.image, again.image) and np.array_equal(first.diptych, again.diptych)
    assert not np.array_equal(first.image, other.image)


def test_torch_cache_off_is_bit_for_bit_the_bundle_without_cache_data():
    plain, cached = bundles()
    want, _ = _generate(plain, "torch", 3)
    got, _ = _generate(cached, "torch", 3, cache="off")
    assert got.metadata["step_cache"]["full_steps"] == STEPS
    assert np.array_equal(got.image, want.image) and np.array_equal(got.diptych, want.diptych)


def test_torch_without_cache_programs_or_with_speed_options_declines_by_name(tmp_path):
    _, cached = bundles()
    stripped = tmp_path / "stripped"
    shutil.copytree(cached, stripped)
    metadata = dict(read_manifest(stripped, kind="bundle").metadata)
    metadata["torch_programs"] = {k: v for k, v in metadata["torch_programs"].items() if k in GRAPH_NAMES}
    for name in CACHE_GRAPH_NAMES:
        (stripped / "torch" / f"{name}.pt2").unlink()
    write_manifest(stripped, "bundle", metadata)
    with DefectSynthesizer.from_bundle(stripped, "torch") as synth:  # the default turns off
        assert synth.step_cache.mode == "off"
    with pytest.raises(StepCacheError, match="no torch programs for the step-cache graphs.*--torch-programs"):
        DefectSynthesizer.from_bundle(stripped, "torch", cache="static")
    with pytest.raises(StepCacheError, match="--cuda-graph captures a static step-cache schedule.*--cache static"):
        DefectSynthesizer.from_bundle(cached, "torch", cache="dynamic", cuda_graph=True)
    with pytest.raises(StepCacheError, match="--compile, --fp8 and --fused-attention apply to the uncached step"):
        DefectSynthesizer.from_bundle(cached, "torch", cache="static", compile=True)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_static_schedule_runs_on_the_device_and_equals_the_per_call_loop(cuda_graph, monkeypatch):
    """A static schedule runs as one device-resident loop (``denoise_static_cache``; with --cuda-graph through the
    GraphRunner that captures it on CUDA and runs it on its static buffers here): the same final latents, to the bit,
    as the head / tail / cached-step calls through the host, the same steps in full, progress for every step."""
    _, cached = bundles()
    steps_seen = []
    with (
        single_thread(),
        DefectSynthesizer.from_bundle(cached, "torch", cache="static", cuda_graph=cuda_graph) as synth,
    ):
        request = synth.check(_request(7))
        calls = []
        real = type(synth.backend).denoise_static_cache

        def counted(self, *args, **kwargs):
            calls.append(1)
            return real(self, *args, **kwargs)

        monkeypatch.setattr(type(synth.backend), "denoise_static_cache", counted)
        fused, x_fused = _generate_with(synth, request, monkeypatch, steps_seen)
        monkeypatch.setattr(type(synth.backend), "denoise_static_cache", lambda self, *a, **k: None)
        per_call, x_per_call = _generate_with(synth, request, monkeypatch, [])
    assert calls == [1]
    assert np.array_equal(x_fused, x_per_call)
    assert fused.metadata["step_cache"]["ran"] == per_call.metadata["step_cache"]["ran"]
    assert steps_seen == list(range(1, STEPS + 1))


def _generate_with(synth, request, monkeypatch, steps_seen: list):
    kept = _spy_on_cached_latents(monkeypatch)
    result = synth.generate(request, progress=lambda step, total: steps_seen.append(step) or True)
    return result, kept["x"]
