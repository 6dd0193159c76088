"""``unidg bench cache``: step caching side by side on one machine in one run — transformer evaluations per sample,
wall time per sample, and the cached output against the uncached one (PSNR of the result and inside the dilated
target mask), for cache off, the bundle's static schedule and its dynamic threshold, interleaved request by request.

The requests are the shipped sample cases (runtime/assets/samples) at their own seeds. ``--vs-diffusers`` adds a
fourth column in the same interleaved rounds: the stock diffusers FluxFillPipeline (with the key bias, 28 full steps,
the runtime's noise) on the bundle's weights folder, the baseline a diffusers user would run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from unidg.core.errors import OptionError
from unidg.export.parity import psnr
from unidg.runtime.bundle import Bundle
from unidg.runtime.cli_options import write_json_option
from unidg.runtime.demo import DEFAULT_BUNDLE, DEFAULT_SAMPLES, read_samples
from unidg.runtime.step_cache import OFF
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest

MODES = ("off", "static", "dynamic")
STOCK = "diffusers"


@dataclass
class StockResult:
    image: np.ndarray
    metadata: dict


class StockDiffusers:
    """The stock diffusers FluxFillPipeline with the key bias, uncached, on the weights ``bundle`` was exported from:
    the same ``generate(request)`` face as a synthesizer, so it takes its turn in the interleaved rounds."""

    def __init__(self, bundle: Bundle, weights: str | None, threads: int | None) -> None:
        import torch

        from unidg.export.bench_runtime import stock_fill_pipeline, weights_folder
        from unidg.train.loading import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model = load_model(weights_folder(bundle, weights))
        self.model.settings = replace(self.model.settings, resolution=bundle.resolution)
        self.pipeline = stock_fill_pipeline(self.model)
        self.step_cache = OFF

    def generate(self, request: SynthesisRequest) -> StockResult:
        from unidg.export.bench_runtime import run_stock_diffusers

        image = run_stock_diffusers(self.pipeline, self.model, request, bias=True)
        steps = request.steps or self.model.settings.steps
        return StockResult(image, {"timings_s": {"denoise": None}, "step_cache": {"full_steps": steps}})

    def close(self) -> None:
        pass


def _requests(samples: Path, limit: int | None) -> list[SynthesisRequest]:
    cases = read_samples(samples)[:limit]
    return [
        SynthesisRequest.from_files(c.reference, c.reference_mask, c.source, c.mask, seed=c.seed, name=c.id)
        for c in cases
    ]


def bench_cache(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise OptionError(f"--repeats must be >= 1 (got {args.repeats})")
    bundle = Path(args.bundle) if args.bundle else DEFAULT_BUNDLE
    requests = _requests(Path(args.samples) if args.samples else DEFAULT_SAMPLES, args.requests)
    options = {"threads": args.threads} if args.threads else {}
    dynamic = {"cache_threshold": args.cache_threshold} if args.cache_threshold else {}
    synths = {
        "off": DefectSynthesizer.from_bundle(bundle, cache="off", **options),
        "static": DefectSynthesizer.from_bundle(bundle, cache="static", **options),
        "dynamic": DefectSynthesizer.from_bundle(bundle, cache="dynamic", **dynamic, **options),
    }
    if args.vs_diffusers:
        synths[STOCK] = StockDiffusers(synths["off"].bundle, args.weights, args.threads)
    modes = list(synths)
    seconds: dict[str, list[float]] = {mode: [] for mode in modes}
    denoise: dict[str, list[float]] = {mode: [] for mode in modes}  # the sampling loop alone (metadata timings)
    full: dict[str, list[int]] = {mode: [] for mode in modes}
    whole: dict[str, list[float]] = {mode: [] for mode in modes}
    region: dict[str, list[float]] = {mode: [] for mode in modes}
    for synth in synths.values():
        synth.generate(requests[0])  # warm-up
    for repeat in range(args.repeats):
        for request in requests:  # interleaved, so drifts in machine load hit every mode alike
            results = {}
            for mode, synth in synths.items():
                started = time.perf_counter()
                results[mode] = synth.generate(request)
                seconds[mode].append(time.perf_counter() - started)
                loop_s = results[mode].metadata["timings_s"]["denoise"]
                if loop_s is not None:  # the stock pipeline times only the whole call
                    denoise[mode].append(float(loop_s))
                if repeat == 0:
                    full[mode].append(int(results[mode].metadata["step_cache"]["full_steps"]))
            if repeat == 0:
                mask = results["off"].mask
                for mode in modes:
                    whole[mode].append(psnr(results[mode].image, results["off"].image))
                    region[mode].append(psnr(results[mode].image[mask], results["off"].image[mask]))
    base = statistics.median(seconds["off"])
    base_denoise = statistics.median(denoise["off"])
    rows = []
    for mode in modes:
        median = statistics.median(seconds[mode])
        loop = statistics.median(denoise[mode]) if denoise[mode] else None
        finite = [p for p in region[mode] if math.isfinite(p)]
        rows.append(
            {
                "mode": mode,
                "setting": synths[mode].step_cache.describe(),
                "evaluations_per_sample": float(np.mean(full[mode])),
                "median_s_per_sample": median,
                "time_vs_off": median / base,
                "median_denoise_s": loop,
                "denoise_vs_off": None if loop is None else loop / base_denoise,
                "psnr_min_db": None if not finite else float(min(whole[mode])),
                "defect_psnr_min_db": None if not finite else float(min(finite)),
            }
        )
    for synth in synths.values():
        synth.close()
    print(f"bundle {bundle}, {len(requests)} requests x {args.repeats} repeats, threads {args.threads or 'all'}")
    print(
        f"{'mode':<9} {'evals/sample':>12} {'s/sample':>9} {'vs off':>7} {'denoise s':>10} {'vs off':>7} "
        f"{'PSNR min':>9} {'defect min':>11}"
    )
    for row in rows:
        psnr_text = "-" if row["psnr_min_db"] is None else f"{row['psnr_min_db']:.1f}"
        defect = "-" if row["defect_psnr_min_db"] is None else f"{row['defect_psnr_min_db']:.1f}"
        loop = "-" if row["median_denoise_s"] is None else f"{row['median_denoise_s']:.3f}"
        loop_ratio = "-" if row["denoise_vs_off"] is None else f"{row['denoise_vs_off']:.2f}"
        print(
            f"{row['mode']:<9} {row['evaluations_per_sample']:>12.1f} {row['median_s_per_sample']:>9.3f} "
            f"{row['time_vs_off']:>7.2f} {loop:>10} {loop_ratio:>7} {psnr_text:>9} {defect:>11}"
        )
    write_json_option(args.json, json.dumps({"bundle": str(bundle), "rows": rows}, indent=2), say=False)
    return 0
