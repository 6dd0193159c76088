"""Shared, process-cached inputs of the export / calibration tests: a UniDG-nano weights folder with random weights,
its fp32 bundle at S = 64, a small UDG folder and a calibration set. Each is built once per test process."""

from __future__ import annotations

import atexit
import contextlib
import functools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

RESOLUTION = 64  # 4 x 8 image tokens: the smallest diptych the nano VAE and transformer handle
NANO_SEED = 7
CALIB_SAMPLES = 3
CALIB_SUBSET = "every:7"  # steps 0, 7, 14, 21, 27


@functools.cache
def workspace() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="unidg-export-tests-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def make_weights(folder: Path, seed: int = NANO_SEED) -> Path:
    from unidg.train.loading import save_model
    from unidg.train.model import UniDGModel

    return save_model(UniDGModel.from_preset("nano", seed=seed), folder)


@functools.cache
def nano_weights() -> Path:
    return make_weights(workspace() / "weights")


@functools.cache
def other_weights() -> Path:
    return make_weights(workspace() / "other-weights", seed=NANO_SEED + 1)


@functools.cache
def nano_bundle() -> Path:
    from unidg.export.bundle import export_bundle

    with single_thread():
        export_bundle(nano_weights(), workspace() / "bundle", resolution=RESOLUTION, progress=None)
    return workspace() / "bundle"


@functools.cache
def udg_folder() -> Path:
    from unidg.core.udg import UDGWriter, caption_stub
    from unidg.export.parity import synthetic_request

    folder = workspace() / "udg"
    with UDGWriter(folder) as writer:
        for i in range(4):
            reference, reference_mask, source, _ = synthetic_request(64, seed=i)
            writer.add(
                source, reference, reference_mask, caption_stub("scratch", "plate", reference_mask), "plate", "scratch"
            )
    return folder


def build_calib_set(out: Path, seed: int = 0, weights: Path | None = None) -> Path:
    from unidg.calib.build import build_calib

    with single_thread():
        build_calib(
            udg_folder(),
            weights or nano_weights(),
            out,
            samples=CALIB_SAMPLES,
            steps=28,
            step_subset=CALIB_SUBSET,
            seed=seed,
            held_out=1,
            resolution=RESOLUTION,
        )
    return out


@functools.cache
def calib_set() -> Path:
    return build_calib_set(workspace() / "calib")


@functools.cache
def load_nano_model():
    from unidg.train.loading import load_model

    return load_model(nano_weights())


@functools.cache
def bf16_bundle() -> Path:
    """The nano bundle exported in bf16 (the precision TensorRT builds; onnxruntime's CPU provider cannot run it)."""
    from unidg.export.bundle import export_bundle

    with single_thread():
        export_bundle(
            nano_weights(), workspace() / "bundle-bf16", precision="bf16", resolution=RESOLUTION, progress=None
        )
    return workspace() / "bundle-bf16"


@functools.cache
def fp8_bf16_bundle() -> tuple[Path, dict]:
    """(folder, accuracy report) of the default FP8 recipe: calibrated and exported from the bf16 model, its
    reference the bf16 bundle above."""
    from unidg.export.quantize import quantize_bundle

    out = workspace() / "bundle-fp8-bf16"
    with single_thread():
        report = quantize_bundle(nano_weights(), calib_set(), "fp8", out, reference=bf16_bundle(), progress=None)
    return out, report
