"""``unidg export cache-calibrate``: the accuracy gate of step caching, and the setting it records in a bundle.

For each candidate (dynamic thresholds, and a static schedule derived from each threshold's decisions on the
calibration samples) every held-out sample of the calibration set runs its full 28-step trajectory through the
bundle's graphs in onnxruntime, cached and uncached from the same noise. Measured against the uncached output: PSNR
of the generated square (the diptych's right half, what is pasted back into the source) and PSNR inside the defect
region (the dilated target mask, read back from the Fill condition's mask channels), the largest latent difference,
and the transformer evaluations (full steps) per sample. The gate keeps candidates whose worst defect-region PSNR
reaches the bar (35 dB by default: docs/step-cache.md says why) and records the fastest of each mode; the faster of
the two becomes the bundle's default. A setting asked for by name that fails is refused by name; nothing is written.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unidg.calib.build import CalibSet, read_calib
from unidg.core.latents import PACKED_CHANNELS, model_to_pixels, unpack_latents
from unidg.core.manifest import Manifest
from unidg.core.staging import OutputFolderError
from unidg.core.weights_folder import staged_folder
from unidg.export.bundle import write_bundle_manifest
from unidg.export.parity import gate_figures, psnr, verdict
from unidg.runtime.backends.base import StepConditioning
from unidg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from unidg.runtime.bundle import Bundle, load_bundle
from unidg.runtime.sampler import denoise, denoise_cached, sampling_sigmas
from unidg.runtime.step_cache import StepCache, StepCacheError, check_threshold, parse_setting, schedule_name

DEFAULT_MIN_DEFECT_PSNR = 35.0  # docs/step-cache.md: why 35 and not the 30 dB started from
DEFAULT_THRESHOLDS = (0.04, 0.08, 0.12, 0.16, 0.24, 0.32)
STATIC_MAJORITY = 0.5  # a step is full in the derived schedule when at least half the samples computed it


class CacheGateError(StepCacheError):
    """No candidate (or the setting asked for) reaches the gate's bar; nothing was written."""

    def __init__(self, message: str, table: list[dict]) -> None:
        super().__init__(message)
        self.table = table


@dataclass(frozen=True)
class CandidateResult:
    """One candidate setting measured on the held-out samples against the uncached output."""

    name: str  # "dynamic:0.08" or "static:1101..."
    mode: str
    threshold: float | None
    schedule: tuple[int, ...] | None
    samples: int
    full_steps_mean: float
    full_steps_max: int
    steps: int
    psnr_min: float
    psnr_mean: float
    defect_psnr_min: float
    defect_psnr_mean: float
    latent_max_abs: float
    min_defect_psnr: float

    @property
    def passed(self) -> bool:
        return self.defect_psnr_min >= self.min_defect_psnr

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.full_steps_mean / self.steps

    def to_dict(self) -> dict:
        schedule = list(self.schedule) if self.schedule is not None else None
        return gate_figures(self, schedule=schedule, saved_fraction=round(self.saved_fraction, 4))

    def row(self) -> str:
        return (
            f"{self.name:<40} full {self.full_steps_mean:5.1f}/{self.steps} ({100 * self.saved_fraction:4.1f}% saved)  "
            f"PSNR {self.psnr_min:5.1f}/{self.psnr_mean:5.1f} dB  defect {self.defect_psnr_min:5.1f}/"
            f"{self.defect_psnr_mean:5.1f} dB  latent {self.latent_max_abs:.4f}  {verdict(self.passed)}"
        )


def unpack_mask(cond: np.ndarray, latent_hw: tuple[int, int], vae_downsample: int = 8) -> np.ndarray:
    """The pixel mask (B, H, W) bool inside a Fill condition [B, N, 320] (inverse of unidg.core.latents.pack_mask)."""
    h, w = latent_hw
    blocks = unpack_latents(np.ascontiguousarray(cond[..., PACKED_CHANNELS:]), h, w)  # (B, f*f, h, w)
    f = vae_downsample
    pixels = blocks.reshape(blocks.shape[0], f, f, h, w).transpose(0, 3, 1, 4, 2).reshape(-1, h * f, w * f)
    return pixels > 0.5


class _Runner:
    """Full trajectories of calibration samples through a bundle's graphs (uncached or cached)."""

    def __init__(self, bundle: Bundle, threads: int | None) -> None:
        self.bundle = bundle
        self.backend = OnnxRuntimeBackend.from_bundle(bundle, threads=threads)
        self.batch = bundle.batch or 1

    def _tile(self, array: np.ndarray) -> np.ndarray:
        return np.repeat(array, self.batch, 0) if self.batch > 1 else array

    def conditioning(self, sample: dict) -> StepConditioning:
        return StepConditioning(
            cond=self._tile(sample["cond"]),
            ctx=self._tile(sample["ctx"]),
            key_bias=self._tile(sample["key_bias"]),
            guidance=self._tile(sample["guidance"]),
            img_ids=sample["img_ids"],
            txt_ids=sample["txt_ids"],
        )

    def run(self, sample: dict, sigmas: np.ndarray, cache: StepCache | None) -> tuple[np.ndarray, list[bool]]:
        noise, conditioning = self._tile(sample["noise"]), self.conditioning(sample)
        if cache is None:
            return denoise(self.backend, noise, conditioning, sigmas)[:1], [True] * (len(sigmas) - 1)
        x, decider = denoise_cached(self.backend, noise, conditioning, sigmas, cache)
        return x[:1], decider.decisions

    def decode(self, x: np.ndarray) -> np.ndarray:
        h, w = self.bundle.latent_hw
        pixels = self.backend.decode_latents(self._tile(unpack_latents(x, h, w)))[:1]
        return model_to_pixels(pixels)[0]


def derive_schedule(decisions: list[list[bool]], majority: float = STATIC_MAJORITY) -> tuple[int, ...]:
    """A static schedule from dynamic decisions on several samples: full where at least ``majority`` computed it."""
    share = np.mean(np.asarray(decisions, dtype=np.float64), axis=0)
    schedule = [int(s >= majority) for s in share]
    schedule[0] = 1
    return tuple(schedule)


def measure(
    bundle: Bundle,
    calib: CalibSet,
    candidates: Sequence[StepCache],
    *,
    min_defect_psnr: float,
    threads: int | None = None,
    samples: int | None = None,
) -> list[CandidateResult]:
    """Every candidate against the uncached output on the held-out samples."""
    runner = _Runner(bundle, threads)
    held_out = list(calib.samples(held_out=True))[:samples]
    if not held_out:
        raise StepCacheError(f"--calib {calib.path} has no held-out samples to measure the cache on")
    sigmas = sampling_sigmas(int(calib.metadata["steps"]), bundle.image_tokens)
    steps = len(sigmas) - 1
    references = []
    for sample in held_out:
        x, _ = runner.run(sample, sigmas, None)
        half = bundle.resolution
        region = unpack_mask(sample["cond"], bundle.latent_hw)[0][:, half:]
        references.append((x, runner.decode(x)[:, half:], region))
    results = []
    for cache in candidates:
        full, whole, defect, latent = [], [], [], []
        for sample, (x_ref, image_ref, region) in zip(held_out, references):
            x, decisions = runner.run(sample, sigmas, cache)
            image = runner.decode(x)[:, bundle.resolution :]
            full.append(sum(decisions))
            whole.append(psnr(image, image_ref))
            defect.append(psnr(image[region], image_ref[region]) if region.any() else math.inf)
            latent.append(float(np.max(np.abs(x - x_ref))))
        name = f"dynamic:{cache.threshold:g}" if cache.mode == "dynamic" else schedule_name(cache.schedule or ())
        finite = [p for p in whole if math.isfinite(p)] or [math.inf]
        finite_defect = [p for p in defect if math.isfinite(p)] or [math.inf]
        results.append(
            CandidateResult(
                name=name,
                mode=cache.mode,
                threshold=cache.threshold,
                schedule=tuple(int(v) for v in cache.schedule) if cache.schedule else None,
                samples=len(held_out),
                full_steps_mean=float(np.mean(full)),
                full_steps_max=int(max(full)),
                steps=steps,
                psnr_min=float(min(whole)),
                psnr_mean=float(np.mean(finite)),
                defect_psnr_min=float(min(defect)),
                defect_psnr_mean=float(np.mean(finite_defect)),
                latent_max_abs=float(max(latent)),
                min_defect_psnr=min_defect_psnr,
            )
        )
    runner.backend.close()
    return results


def candidate_settings(
    bundle: Bundle, calib: CalibSet, thresholds: Sequence[float], threads: int | None = None
) -> list[StepCache]:
    """Dynamic candidates at ``thresholds`` plus, per threshold, the static schedule its calibration-sample decisions
    derive (deduplicated)."""
    runner = _Runner(bundle, threads)
    sigmas = sampling_sigmas(int(calib.metadata["steps"]), bundle.image_tokens)
    calibration = list(calib.samples(held_out=False))
    candidates: list[StepCache] = []
    schedules: list[tuple[int, ...]] = []
    for threshold in thresholds:
        cache = StepCache("dynamic", threshold=check_threshold(threshold, "--thresholds"))
        candidates.append(cache)
        if calibration:
            decisions = [runner.run(sample, sigmas, cache)[1] for sample in calibration]
            schedule = derive_schedule(decisions)
            if schedule not in schedules:
                schedules.append(schedule)
    runner.backend.close()
    return candidates + [StepCache("static", schedule=schedule) for schedule in schedules]


def choose(results: Sequence[CandidateResult]) -> dict[str, CandidateResult]:
    """The fastest passing candidate of each mode (ties: the smaller latent error)."""
    best: dict[str, CandidateResult] = {}
    for result in results:
        if not result.passed:
            continue
        key = (result.full_steps_mean, result.latent_max_abs)
        current = best.get(result.mode)
        if current is None or key < (current.full_steps_mean, current.latent_max_abs):
            best[result.mode] = result
    return best


def gate_record(chosen: dict[str, CandidateResult], results: Sequence[CandidateResult], calib: CalibSet) -> dict:
    """What the manifest records: the default mode, the chosen setting per mode, the bar and the whole table."""
    # Static is the default whenever a schedule passes: deterministic per seed, independent of the batch, and the
    # form captured CUDA graphs and TensorRT engines run; dynamic stays available by name.
    record: dict = {
        "default": "static" if "static" in chosen else ("dynamic" if "dynamic" in chosen else "off"),
        "min_defect_psnr": next(iter(results)).min_defect_psnr if results else DEFAULT_MIN_DEFECT_PSNR,
        "calib": {"path": str(calib.path), "fingerprint": calib.manifest.fingerprint},
        "table": [r.to_dict() for r in results],
    }
    if "static" in chosen:
        record["static"] = {"schedule": list(chosen["static"].schedule or ()), "name": chosen["static"].name}
    if "dynamic" in chosen:
        record["dynamic"] = {"threshold": chosen["dynamic"].threshold, "name": chosen["dynamic"].name}
    return record


def cache_calibrate(
    bundle_path: str | Path,
    calib_path: str | Path,
    out: str | Path,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    settings: Sequence[str] = (),
    min_defect_psnr: float = DEFAULT_MIN_DEFECT_PSNR,
    samples: int | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress=None,
) -> tuple[Manifest, list[CandidateResult]]:
    """Measure the candidates, gate them, and write ``out``: the bundle with the chosen setting recorded."""
    if not math.isfinite(min_defect_psnr) or min_defect_psnr <= 0:
        raise StepCacheError(f"--min-defect-psnr {min_defect_psnr!r} must be a finite number of dB > 0, e.g. 30")
    bundle = load_bundle(bundle_path)
    if Path(out).resolve() == bundle.path.resolve():
        raise OutputFolderError("--out is the input bundle; write the calibrated bundle to a new folder")
    if not bundle.cache_graphs:
        raise StepCacheError(
            f"bundle {bundle.path} has no step-cache graphs; add them first with "
            "`unidg export cache-graphs --bundle B --weights W --out B2`"
        )
    fingerprint = (bundle.metadata.get("weights") or {}).get("fingerprint")
    calib = read_calib(calib_path, weights_fingerprint=fingerprint)
    if calib.resolution != bundle.resolution:
        raise StepCacheError(
            f"--calib {calib.path} is at S={calib.resolution}, the bundle at S={bundle.resolution}; build a "
            "calibration set at the bundle's resolution (`unidg calib build --resolution`)"
        )
    steps = int(calib.metadata["steps"])
    asked = [parse_setting(text, steps) for text in settings]
    if progress:
        progress(f"deriving static schedules from {len(thresholds)} thresholds on the calibration samples")
    candidates = candidate_settings(bundle, calib, thresholds, threads) if thresholds else []
    candidates += [c for c in asked if c not in candidates]
    if progress:
        progress(f"measuring {len(candidates)} candidates on the held-out samples")
    results = measure(bundle, calib, candidates, min_defect_psnr=min_defect_psnr, threads=threads, samples=samples)
    if progress:
        for result in results:
            progress(result.row())
    table = [r.to_dict() for r in results]
    by_setting = dict(zip(candidates, results))
    failing = [by_setting[c].name for c in asked if not by_setting[c].passed]
    if failing:
        raise CacheGateError(
            f"step-cache setting(s) {failing} fail the gate (defect-region PSNR >= {min_defect_psnr} dB on every "
            "held-out sample); choose a lower threshold or a schedule with more full steps",
            table,
        )
    chosen = choose([by_setting[c] for c in asked] if asked else results)
    if not chosen:
        raise CacheGateError(
            f"no candidate reaches defect-region PSNR >= {min_defect_psnr} dB on every held-out sample; try lower "
            "--thresholds",
            table,
        )
    metadata = dict(bundle.metadata)
    metadata["step_cache"] = {**bundle.step_cache, "gate": gate_record(chosen, results, calib)}
    with staged_folder(out, overwrite=overwrite) as staging:
        for relative in bundle.files:
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(bundle.file_path(relative), target)
        manifest = write_bundle_manifest(staging, metadata)
    return manifest, results
