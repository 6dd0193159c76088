"""The accuracy gate of ``unidg export quantize``: the quantized step graph against the unquantized bundle, both in
onnxruntime, on a calibration set's held-out samples — cosine similarity of the velocity at every captured step, and
PSNR of the final decoded diptych after the full trajectory from the same noise (figures from ``unidg.export.parity``).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unidg.calib.build import CalibSet
from unidg.core.latents import model_to_pixels
from unidg.export.bf16_emulation import emulated_bf16_file
from unidg.export.parity import compare, cosine, gate_figures, onnx_session, psnr, verdict
from unidg.export.quantize_modelopt import QuantizationError
from unidg.runtime.bundle import STEP_INPUTS, STEP_POSITION_INPUTS, Bundle
from unidg.runtime.sampler import sampling_sigmas
from unidg.train.model import unpack_latents

DEFAULT_MIN_COSINE = 0.995
DEFAULT_MIN_PSNR = 30.0


class AccuracyGateError(QuantizationError):
    """The quantized bundle is less accurate than the gate allows; nothing was written."""

    def __init__(self, message: str, report: dict) -> None:
        super().__init__(message)
        self.report = report


def tile_batch(feeds: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """One sample's step inputs repeated to a static bundle's batch (token positions have no batch axis)."""
    return {k: (np.repeat(v, batch, 0) if k not in STEP_POSITION_INPUTS else v) for k, v in feeds.items()}


@dataclass(frozen=True)
class AccuracyReport:
    format: str
    samples: int
    records: int
    velocity_cosine_mean: float
    velocity_cosine_min: float
    latents_max_abs: float
    psnr_mean: float
    psnr_min: float
    min_cosine: float
    min_psnr: float

    @property
    def passed(self) -> bool:
        return self.velocity_cosine_mean >= self.min_cosine and self.psnr_min >= self.min_psnr

    def to_dict(self) -> dict:
        return gate_figures(self)

    def __str__(self) -> str:
        return (
            f"{self.format} accuracy on {self.samples} held-out samples ({self.records} step inputs): velocity cosine "
            f"mean {self.velocity_cosine_mean:.4f} (min {self.velocity_cosine_min:.4f}, gate >= {self.min_cosine}); "
            f"final diptych PSNR mean {self.psnr_mean:.2f} dB (min {self.psnr_min:.2f} dB, gate >= {self.min_psnr}); "
            f"{verdict(self.passed)}"
        )


def _session(path: Path, precision: str, bf16: bool, scratch: Path):
    """An onnxruntime CPU session of ``path``; a bf16 graph as its float32 emulation (written into ``scratch``)."""
    if bf16:
        emulated = scratch / f"{len(list(scratch.iterdir()))}-{path.name}"
        emulated_bf16_file(path, emulated)
        path = emulated
    return onnx_session(path, precision)


def accuracy_report(
    quantized_step: Path,
    reference: Bundle,
    calib: CalibSet,
    fmt: str,
    *,
    min_cosine: float,
    min_psnr: float,
    samples: int | None = None,
    high_precision: str = "fp32",
) -> AccuracyReport:
    """Quantized vs unquantized step graph (onnxruntime) on the calibration set's held-out samples. With a bf16
    ``high_precision`` (and a bf16 reference bundle) every graph runs as its float32 emulation with bf16 rounding."""
    scratch = Path(tempfile.mkdtemp(prefix=".unidg-accuracy."))
    try:
        quantized = _session(quantized_step, fmt, high_precision == "bf16", scratch)
        unquantized = _session(
            reference.graph_path("step"), reference.precision, reference.precision == "bf16", scratch
        )
        decoder = _session(
            reference.graph_path("vae_decoder"), reference.precision, reference.precision == "bf16", scratch
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    batch = reference.batch or 1

    def run(session, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return session.run(None, tile_batch(feeds, batch))[0][:1]

    cosines = []
    for record in calib.records(held_out=True):
        step = float(record["sigma_next"][0] - record["sigma"][0])
        v_quant = (run(quantized, record) - record["x"]) / step
        v_full = (run(unquantized, record) - record["x"]) / step
        cosines.append(cosine(v_quant, v_full))
    sigmas = None
    psnrs, latent_errors, count = [], [], 0
    h, w = reference.latent_hw
    for sample in calib.samples(held_out=True):
        if samples is not None and count >= samples:
            break
        if sigmas is None:
            sigmas = sampling_sigmas(int(calib.metadata["steps"]), sample["noise"].shape[1])
        conditioning = {name: sample[name] for name in STEP_INPUTS if name in sample}  # all but x and the sigmas
        finals = []
        for session in (quantized, unquantized):
            x = sample["noise"]
            for i in range(len(sigmas) - 1):
                sigma, sigma_next = np.array([sigmas[i]], np.float32), np.array([sigmas[i + 1]], np.float32)
                x = run(session, {**conditioning, "x": x, "sigma": sigma, "sigma_next": sigma_next})
            finals.append(x)
        latent_errors.append(compare(finals[0], finals[1]).max_abs)
        images = []
        for x in finals:
            latents = unpack_latents(torch.from_numpy(x), h // 2, w // 2).numpy()
            images.append(model_to_pixels(run(decoder, {"latents": latents}))[0])
        psnrs.append(psnr(images[0], images[1]))
        count += 1
    if not cosines or not psnrs:
        raise QuantizationError(f"--calib {calib.path} has no held-out samples to measure accuracy on")
    finite = [p for p in psnrs if math.isfinite(p)]
    return AccuracyReport(
        format=fmt,
        samples=count,
        records=len(cosines),
        velocity_cosine_mean=float(np.mean(cosines)),
        velocity_cosine_min=float(np.min(cosines)),
        latents_max_abs=float(max(latent_errors)),
        psnr_mean=float(np.mean(finite)) if finite else math.inf,
        psnr_min=float(min(psnrs)),
        min_cosine=min_cosine,
        min_psnr=min_psnr,
    )
