"""End-to-end parity: the runtime on a bundle exported by unidg.export vs the torch model sampling the same request.

A random nano model (S = 64) is saved as a weights folder, exported to a dynamic-batch fp32 bundle, and run through
the runtime (onnxruntime, CPU). The torch side runs the same request through the torch reference sampler on the same
weights, from the same seeded noise. The final images must agree to >= 40 dB PSNR (measured: see docs/runtime.md),
and every pixel outside the dilated mask must be the source's own in every output.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from runtime_fixtures import sample_request_arrays, write_sample_files

from unidg.cli import main
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxscript")
pytestmark = pytest.mark.slow  # one real export (~35 s of CPU) shared by the tests below

RESOLUTION = 64


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(weights folder, bundle folder, the torch model) for a random nano model at S = 64."""
    from unidg.export.bundle import export_bundle
    from unidg.train.loading import load_model, save_model
    from unidg.train.model import UniDGModel
    from unidg.train.presets import get_preset

    root = tmp_path_factory.mktemp("parity")
    settings = dataclasses.replace(get_preset("nano").settings, resolution=RESOLUTION)
    save_model(UniDGModel.from_preset("nano", settings=settings, seed=7), root / "weights")
    export_bundle(root / "weights", root / "bundle", batch="dynamic", progress=None)
    return root / "weights", root / "bundle", load_model(root / "weights")


def _requests() -> list[SynthesisRequest]:
    shapes = [(48, 40), (70, 52)]
    return [
        SynthesisRequest(*sample_request_arrays(shape, seed=i), seed=100 + i, guidance=1.0 + i, name=f"request {i}")
        for i, shape in enumerate(shapes)
    ]


def test_runtime_matches_the_torch_sampler(exported):
    from unidg.train.sampler import sample_request

    _, bundle, model = exported
    requests = _requests()
    with DefectSynthesizer.from_bundle(bundle) as synth:
        results = synth.generate_batch(requests)  # both in one onnxruntime pass
    for request, result in zip(requests, results):
        reference = sample_request(model, synth.check(request))
        figure = psnr(result.image, reference.image)
        print(f"{request.name}: image PSNR {figure:.1f} dB, diptych PSNR {psnr(result.diptych, reference.diptych):.1f}")
        assert figure >= 40.0
        assert np.array_equal(result.image[~result.mask], request.source[~result.mask])
        assert np.array_equal(reference.image[~result.mask], request.source[~result.mask])
        assert not np.array_equal(result.image, request.source)

    diptych = results[0].diptych
    assert diptych[:, RESOLUTION:].std() > 1.0  # the model produced a picture, not a flat field


def test_demo_runs_an_exported_bundle(exported, tmp_path, capsys):
    _, bundle, _ = exported
    samples = tmp_path / "samples"
    cases = []
    for i, category in enumerate(["scratch", "dirt"]):
        files = write_sample_files(samples, f"c{i}", seed=i)
        cases.append({key: path.name for key, path in files.items()} | {"id": f"c{i}", "category": category})
    (samples / "samples.json").write_text(json.dumps(cases))
    out = tmp_path / "demo"
    assert main(["demo", "--bundle", str(bundle), "--samples", str(samples), "--out", str(out)]) == 0
    assert (out / "contact_sheet.png").is_file()
    assert sorted(p.name for p in (out / "abnormal").iterdir()) == ["c0.png", "c1.png"]
    capsys.readouterr()


def test_bench_runtime_compares_against_the_torch_sampler(exported, tmp_path, capsys):
    weights, bundle, _ = exported
    report = tmp_path / "bench.json"
    args = ["bench", "runtime", "--bundle", str(bundle), "--weights", str(weights), "--repeats", "5", "--steps", "3"]
    assert main([*args, "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "runtime (onnxruntime, CPU)" in printed and "torch reference (train.sampler)" in printed
    assert "torch reference / runtime:" in printed and "PSNR between them" in printed
    figures = json.loads(report.read_text())
    assert len(figures["runtime_s"]) == len(figures["torch_s"]) == 5
    assert figures["speedup"] == pytest.approx(figures["torch_median_s"] / figures["runtime_median_s"])
    assert figures["psnr_db"] >= 40.0 and figures["steps"] == 3


def test_bench_runtime_needs_at_least_five_repeats(exported, capsys):
    weights, bundle, _ = exported
    assert main(["bench", "runtime", "--bundle", str(bundle), "--weights", str(weights), "--repeats", "2"]) == 2
    assert "--repeats must be >= 5" in capsys.readouterr().err


def test_bench_gpu_refuses_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert main(["bench", "runtime", "--gpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_runtime_vs_stock_diffusers_on_the_shipped_bundle(tmp_path, capsys):
    """Four sides on one request; the stock FluxFillPipeline with the key bias computes what the runtime computes."""
    pytest.importorskip("diffusers")
    report = tmp_path / "vs.json"
    args = ["bench", "runtime", "--vs-diffusers", "--steps", "1", "--repeats", "3", "--threads", "1"]
    assert main([*args, "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "| S | threads | diffusers FluxFillPipeline + bias | diffusers FluxFillPipeline |" in printed
    (row,) = json.loads(report.read_text())["rows"]
    assert row["resolution"] == 128 and row["threads"] == 1 and row["steps"] == 1
    assert sorted(row["seconds"]) == sorted(
        [
            "diffusers FluxFillPipeline + bias",
            "diffusers FluxFillPipeline",
            "torch reference (train.sampler)",
            "runtime (onnxruntime)",
        ]
    )
    assert all(len(seconds) == 3 for seconds in row["seconds"].values())
    assert len(row["load_average"]) == 2 and min(row["load_average"]) >= 0
    assert row["psnr_runtime_vs_diffusers_bias_db"] >= 40.0


def test_bench_runtime_takes_several_bundles_and_thread_counts_only_with_vs_diffusers(capsys):
    assert main(["bench", "runtime", "--threads", "1", "2"]) == 2
    assert "several --bundle or --threads values need --vs-diffusers" in capsys.readouterr().err
