"""`unidg calib build`: step inputs captured along real trajectories, deterministic per seed, tied to the weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from export_fixtures import (
    CALIB_SAMPLES,
    RESOLUTION,
    build_calib_set,
    calib_set,
    load_nano_model,
    nano_weights,
    other_weights,
    single_thread,
    udg_folder,
)

import unidg.calib as calib_package
from unidg.calib.build import CalibError, parse_step_subset, read_calib
from unidg.cli import main
from unidg.core.manifest import read_manifest
from unidg.core.weights_folder import WeightsError


def test_calibration_set_shapes_and_manifest():
    calib = read_calib(calib_set())
    meta = calib.metadata
    weights = read_manifest(nano_weights(), kind="weights")
    assert calib.weights_fingerprint == weights.fingerprint
    assert meta["captured_steps"] == [0, 7, 14, 21, 27] and meta["steps"] == 28
    assert meta["held_out"] == [CALIB_SAMPLES - 1] and meta["resolution"] == RESOLUTION
    assert all(name.endswith(".safetensors") for name in calib.manifest.files)  # shards + nothing pickled
    records = list(calib.records())
    assert len(records) == (CALIB_SAMPLES - 1) * 5
    n = (RESOLUTION // 16) * (2 * RESOLUTION // 16)
    first = records[0]
    assert first["x"].shape == (1, n, 64) and first["cond"].shape == (1, n, 320)
    assert first["key_bias"].shape == (1, meta["context_tokens"] + n)
    assert first["sigma"][0] == pytest.approx(1.0) and first["sigma_next"][0] < first["sigma"][0]
    assert len(list(calib.records(held_out=True))) == 5 and len(list(calib.samples())) == 1


def test_captured_inputs_lie_on_the_torch_trajectory():
    """x at step 7 equals the torch reference sampler run from the stored noise for 7 steps."""
    import torch

    from unidg.runtime.sampler import sampling_sigmas
    from unidg.train.sampler import SamplerInputs, denoise

    calib = read_calib(calib_set())
    sample = next(calib.samples(held_out=False))
    record = [r for r in calib.records() if r["sigma"][0] < 1.0][0]  # sample 0, captured step 7
    n = sample["noise"].shape[1]
    inputs = SamplerInputs(
        cond=torch.from_numpy(sample["cond"]),
        ctx=torch.from_numpy(sample["ctx"]),
        key_bias=torch.from_numpy(sample["key_bias"]),
        img_ids=torch.from_numpy(sample["img_ids"]),
        txt_ids=torch.from_numpy(sample["txt_ids"]),
        height_tokens=RESOLUTION // 16,
        width_tokens=2 * RESOLUTION // 16,
    )
    sigmas = sampling_sigmas(28, n)
    with single_thread():
        x = denoise(load_nano_model(), torch.from_numpy(sample["noise"]), inputs, sigmas[:8].tolist(), 1.0)
    np.testing.assert_allclose(record["x"], x.numpy(), atol=1e-5)
    assert record["sigma"][0] == pytest.approx(sigmas[7])


def test_same_seed_same_bytes_other_seed_other_samples(tmp_path):
    again = read_manifest(build_calib_set(tmp_path / "again", seed=0))
    first = read_manifest(calib_set())
    assert again.files == first.files  # identical shard bytes (sha256) for the same seed
    other = read_manifest(build_calib_set(tmp_path / "other", seed=1))
    assert other.files != first.files
    assert other.metadata["plan"] != first.metadata["plan"]


def test_calibration_set_of_other_weights_is_refused():
    other = read_manifest(other_weights(), kind="weights")
    with pytest.raises(CalibError, match="captured from weights .* not from these weights"):
        read_calib(calib_set(), weights_fingerprint=other.fingerprint)


def test_changed_shard_is_refused(tmp_path):
    folder = tmp_path / "calib"
    shutil.copytree(calib_set(), folder)
    shard = next(folder.glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CalibError, match="does not match its manifest"):
        read_calib(folder)


def test_step_subsets():
    assert parse_step_subset(None, 28) == list(range(28))
    assert parse_step_subset("every:10", 28) == [0, 10, 20, 27]
    assert parse_step_subset("0,3-5,27", 28) == [0, 3, 4, 5, 27]
    with pytest.raises(CalibError, match="outside 0..27"):
        parse_step_subset("28", 28)
    with pytest.raises(CalibError, match="step indices like"):
        parse_step_subset("first", 28)
    with pytest.raises(CalibError, match="needs an integer K"):
        parse_step_subset("every:x", 28)


def test_cli_refusals(tmp_path, capsys):
    args = ["calib", "build", "--data", str(udg_folder()), "--out", str(tmp_path / "c")]
    assert main([*args, "--weights", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    assert main([*args, "--weights", str(nano_weights()), "--samples", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    with pytest.raises(WeightsError):
        from unidg.calib.build import build_calib

        build_calib(udg_folder(), tmp_path, tmp_path / "c")


def test_readme_line_with_overwrite_never_deletes_the_calib_sources(tmp_path, monkeypatch, capsys):
    """`unidg calib build ... --out calib --overwrite` run where a folder calib/ holds other files (here a copy of the
    package's calib/ sources, never the real one): refused before any work, every file kept."""
    sources = Path(calib_package.__file__).resolve().parent
    checkout = tmp_path / "checkout"
    shutil.copytree(sources, checkout / "calib", ignore=shutil.ignore_patterns("__pycache__"))
    before = {p.name: p.read_bytes() for p in (checkout / "calib").iterdir()}
    assert "build.py" in before
    monkeypatch.chdir(checkout)
    args = ["calib", "build", "--data", str(udg_folder()), "--weights", str(nano_weights()), "--out", "calib"]
    args += ["--samples", "2", "--steps", "1", "--resolution", str(RESOLUTION), "--overwrite"]
    with single_thread():
        assert main(args) == 2
    error = capsys.readouterr().err
    assert "--out calib holds files unidg did not write" in error and "Traceback" not in error
    assert {p.name: p.read_bytes() for p in (checkout / "calib").iterdir()} == before
    assert sorted(p.name for p in checkout.iterdir()) == ["calib"]  # no staging folder left either
