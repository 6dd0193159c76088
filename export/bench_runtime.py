"""``unidg bench runtime``: end-to-end time per sample.

CPU (default): this runtime (onnxruntime) and the torch reference sampler (``unidg.train.sampler``, a FluxFillPipeline-
style loop over the same weights) on the same request, interleaved, median of ``--repeats`` runs each, plus the PSNR
between their outputs (they compute the same thing). ``--gpu``: the torch backend at the full preset with random
weights in bf16 on CUDA, per-step latency, 28-step end-to-end and peak memory, with and without text-token folding.

It lives beside the exporter, not in the runtime: the lean runtime never holds torch-comparison code. torch and
unidg.train are imported inside the functions so that ``unidg --help`` stays light.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from unidg.core.attention_bias import build_key_bias
from unidg.core.errors import OptionError
from unidg.core.geometry import defect_token_mask, paste_back, right_half
from unidg.core.latents import pixels_to_model
from unidg.runtime.bundle import Bundle
from unidg.runtime.cli_options import write_json_option
from unidg.runtime.demo import DEFAULT_BUNDLE
from unidg.runtime.sampler import initial_noise
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest, SynthesisResult, resize_reference


@dataclass
class Timing:
    name: str
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def row(self) -> str:
        return f"{self.name:<34} {self.median:>9.3f} {min(self.seconds):>9.3f} {max(self.seconds):>9.3f}"


def bench_request(size: int = 160, seed: int = 0) -> SynthesisRequest:
    """A deterministic request with textures and a blob defect (timing does not depend on the picture)."""
    rng = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:size, 0:size]
    wood = (128 + 60 * np.sin(xx / 7.0 + 3 * np.sin(yy / 23.0)))[..., None] * np.array([1.0, 0.8, 0.55])
    reference = np.clip(wood + rng.normal(0, 6, wood.shape), 0, 255).astype(np.uint8)
    reference_mask = (yy - size * 0.45) ** 2 / 40.0**2 + (xx - size * 0.5) ** 2 / 12.0**2 < 1
    reference[reference_mask] = (35, 25, 20)
    tile = 170 + 40 * ((xx // 20 + yy // 20) % 2)[..., None] * np.ones(3)
    source = np.clip(tile + rng.normal(0, 4, tile.shape), 0, 255).astype(np.uint8)
    target_mask = np.zeros((size, size), dtype=bool)
    target_mask[size // 3 : size // 3 + size // 4, size // 2 : size // 2 + size // 5] = True
    return SynthesisRequest(reference, reference_mask, source, target_mask, seed=seed, name="bench request")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def weights_folder(bundle: Bundle, weights: str | None) -> Path:
    if weights:
        return Path(weights)
    recorded = (bundle.metadata.get("weights") or {}).get("path")
    candidates = [bundle.path.parent / recorded, bundle.path / recorded] if recorded else []
    for candidate in candidates:
        if (candidate / "manifest.json").is_file():
            return candidate
    raise OptionError(
        f"the torch reference needs the weights folder bundle {bundle.path} was exported from (manifest: "
        f"{recorded!r}, not found beside the bundle); pass --weights FOLDER"
    )


# ------------------------------------------------------------------------------------------------------------ CPU
def bench_cpu(args: argparse.Namespace) -> dict:
    # torch and the training stage load in the measurement that needs them, not with this module.
    import torch

    from unidg.train.loading import load_model
    from unidg.train.sampler import sample_request  # the torch reference (FluxFillPipeline-style loop)

    if args.repeats < 5:
        raise OptionError(f"--repeats must be >= 5 for a median worth reporting (got {args.repeats})")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    bundle_path = Path(args.bundle) if args.bundle else DEFAULT_BUNDLE
    if not bundle_path.exists():
        raise OptionError(f"bundle {bundle_path} not found; pass --bundle (a bundle from `unidg export onnx`)")
    # cache off: 28 full steps, as the torch loop
    synth = DefectSynthesizer.from_bundle(bundle_path, threads=threads, spin=args.spin, cache="off")
    bundle = synth.bundle
    weights = weights_folder(bundle, args.weights)
    model = load_model(weights)
    if model.settings.resolution != bundle.resolution:
        model.settings = replace(model.settings, resolution=bundle.resolution)
    request = synth.check(replace(bench_request(), steps=args.steps))

    def run_runtime() -> SynthesisResult:
        return synth.generate(request)

    def run_torch():
        return sample_request(model, request)

    ours, theirs = Timing("runtime (onnxruntime, CPU)"), Timing("torch reference (train.sampler)")
    first, reference = run_runtime(), run_torch()  # warm-up, and the outputs to compare
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both sides alike
        for timing, run in ((ours, run_runtime), (theirs, run_torch)):
            started = time.perf_counter()
            run()
            timing.seconds.append(time.perf_counter() - started)
    reference_image = reference.image if hasattr(reference, "image") else reference
    result = {
        "mode": "cpu",
        "bundle": str(bundle.path),
        "fingerprint": bundle.fingerprint,
        "weights": str(weights),
        "resolution": bundle.resolution,
        "precision": bundle.precision,
        "steps": request.steps,
        "threads": threads,
        "repeats": args.repeats,
        "runtime_s": ours.seconds,
        "torch_s": theirs.seconds,
        "runtime_median_s": ours.median,
        "torch_median_s": theirs.median,
        "speedup": theirs.median / ours.median,
        "psnr_db": psnr(first.image, reference_image),
    }
    header = f"{'end-to-end per sample':<34} {'median s':>9} {'min s':>9} {'max s':>9}"
    print(
        f"unidg bench runtime: {bundle.describe()}, {request.steps} steps, {threads} CPU threads, "
        f"median of {args.repeats}"
    )
    print(header)
    print(ours.row())
    print(theirs.row())
    print(
        f"torch reference / runtime: {result['speedup']:.2f}x   (output PSNR between them: {result['psnr_db']:.1f} dB)"
    )
    return result


# ------------------------------------------------------------------------------------ CPU, against stock diffusers
# scheduler/scheduler_config.json of FLUX.1-Fill-dev: what a stock FluxFillPipeline is loaded with.
FILL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}
VS_DIFFUSERS_SIDES = (
    "diffusers FluxFillPipeline + bias",
    "diffusers FluxFillPipeline",
    "torch reference (train.sampler)",
    "runtime (onnxruntime)",
)


def stock_fill_pipeline(model):
    """A stock diffusers FluxFillPipeline on the model's transformer and VAE with FLUX.1-Fill-dev's scheduler (no text
    encoders: the text branch is the zero tokens UniDG's reference mode feeds, passed as prompt embeddings with the
    Redux tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxFillPipeline

    pipeline = FluxFillPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FILL_SCHEDULER_CONFIG),
        vae=model.vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model.transformer,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def run_stock_diffusers(pipeline, model, request: SynthesisRequest, bias: bool) -> np.ndarray:
    """One request through the stock pipeline: the Alg. 1 diptych, the Redux tokens and the starting noise as the
    runtime makes them (so the outputs are comparable), then FluxFillPipeline with the per-key bias (``bias``; the
    key-bias processor installed) or diffusers' own attention (FluxAttnProcessor swapped back in); the result pasted
    back into the source."""
    import torch
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
    from PIL import Image

    from unidg.train.attention import install_key_bias_processor

    settings = model.settings
    diptych = settings.diptych(request.reference, request.reference_mask, request.source, request.target_mask)
    size = settings.resolution
    reference = resize_reference(np.ascontiguousarray(diptych.image[:, :size]), model.reference_size)
    with torch.no_grad():
        tokens = model.encode_reference(torch.from_numpy(pixels_to_model(reference[None])).to(model.device))
        ctx, _ = model.context(tokens)
    if bias:
        install_key_bias_processor(model.transformer)
        key_bias = build_key_bias(
            defect_token_mask(diptych)[None],
            model.reference_tokens,
            settings.text_tokens,
            settings.alpha,
            settings.fold_text_tokens,
        )
        attention_kwargs = {"key_bias": torch.from_numpy(key_bias)}
    else:
        model.transformer.set_attn_processor(FluxAttnProcessor())
        attention_kwargs = None
    output = pipeline(
        image=Image.fromarray(diptych.image),
        mask_image=Image.fromarray(diptych.mask.astype(np.uint8) * 255),
        height=settings.layout.pixel_hw[0],
        width=settings.layout.pixel_hw[1],
        num_inference_steps=request.steps or settings.steps,
        guidance_scale=settings.guidance if request.guidance is None else request.guidance,
        prompt_embeds=ctx,
        pooled_prompt_embeds=ctx.new_zeros(1, model.transformer.config.pooled_projection_dim),
        generator=torch.Generator().manual_seed(request.seed),
        latents=torch.from_numpy(initial_noise([request.seed], settings.image_tokens)),  # the runtime's noise
        output_type="np",
        joint_attention_kwargs=attention_kwargs,
    )
    install_key_bias_processor(model.transformer)  # leave the model as the torch reference expects it
    image = np.clip(np.round(output.images[0] * 255), 0, 255).astype(np.uint8)
    return paste_back(diptych, right_half(image), request.source)


def _vs_diffusers_row(bundle_path: Path, threads: int, args: argparse.Namespace) -> dict:
    """One table row: the four sides at one resolution (the bundle's) and thread count, interleaved round by round."""
    import torch

    from unidg.train.loading import load_model
    from unidg.train.sampler import sample_request

    torch.set_num_threads(threads)
    # cache off: 28 full steps on every side (step caching is a separate comparison)
    synth = DefectSynthesizer.from_bundle(bundle_path, threads=threads, spin=args.spin, cache="off")
    bundle = synth.bundle
    model = load_model(weights_folder(bundle, args.weights))
    model.settings = replace(model.settings, resolution=bundle.resolution)
    pipeline = stock_fill_pipeline(model)
    request = synth.check(replace(bench_request(), steps=args.steps))
    runs = {
        VS_DIFFUSERS_SIDES[0]: lambda: run_stock_diffusers(pipeline, model, request, bias=True),
        VS_DIFFUSERS_SIDES[1]: lambda: run_stock_diffusers(pipeline, model, request, bias=False),
        VS_DIFFUSERS_SIDES[2]: lambda: sample_request(model, request).image,
        VS_DIFFUSERS_SIDES[3]: lambda: synth.generate(request).image,
    }
    images = {name: run() for name, run in runs.items()}  # warm-up, and the outputs to compare
    load_before = os.getloadavg()[0]
    timings = {name: Timing(name) for name in runs}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit every side alike
        for name, run in runs.items():
            started = time.perf_counter()
            run()
            timings[name].seconds.append(time.perf_counter() - started)
    synth.close()
    medians = {name: timing.median for name, timing in timings.items()}
    runtime, diffusers_bias = VS_DIFFUSERS_SIDES[3], VS_DIFFUSERS_SIDES[0]
    return {
        "resolution": bundle.resolution,
        "threads": threads,
        "steps": request.steps,
        "load_average": [load_before, os.getloadavg()[0]],
        "seconds": {name: timing.seconds for name, timing in timings.items()},
        "median_s": medians,
        "runtime_over_diffusers_bias": medians[runtime] / medians[diffusers_bias],
        "psnr_runtime_vs_diffusers_bias_db": psnr(images[runtime], images[diffusers_bias]),
    }


def bench_vs_diffusers(args: argparse.Namespace) -> dict:
    """Per bundle (resolution) and thread count: the four sides interleaved round by round, load average recorded."""
    import torch

    if args.repeats < 3:
        raise OptionError(f"--repeats must be >= 3 for a median worth reporting (got {args.repeats})")
    thread_counts = args.threads or [1, 2]
    if min(thread_counts) < 1:
        raise OptionError(f"--threads {thread_counts}: give thread counts >= 1")
    bundle_paths = [Path(path) for path in args.bundle] if args.bundle else [DEFAULT_BUNDLE]
    for path in bundle_paths:
        if not path.exists():
            raise OptionError(f"bundle {path} not found; pass --bundle (a bundle from `unidg export onnx`)")
    rows = [_vs_diffusers_row(path, threads, args) for path in bundle_paths for threads in thread_counts]
    result = {
        "mode": "vs-diffusers",
        "repeats": args.repeats,
        "spin": bool(args.spin),
        "torch": torch.__version__,
        "rows": rows,
    }
    print(f"unidg bench runtime --vs-diffusers: end-to-end s per sample, median of {args.repeats} interleaved rounds")
    columns = ["S", "threads", *VS_DIFFUSERS_SIDES, "runtime / diffusers + bias", "load average", "PSNR vs + bias"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for row in rows:
        medians = " | ".join(f"{row['median_s'][name]:.3f}" for name in VS_DIFFUSERS_SIDES)
        load = "–".join(f"{value:.1f}" for value in row["load_average"])
        print(
            f"| {row['resolution']} | {row['threads']} | {medians} | {row['runtime_over_diffusers_bias']:.2f} | "
            f"{load} | {row['psnr_runtime_vs_diffusers_bias_db']:.1f} dB |"
        )
    return result


# ------------------------------------------------------------------------------------------------------------ GPU
def _full_preset_bundle(model, resolution: int, fold: bool) -> Bundle:
    """The facts a full-preset bundle would record, for running the torch backend on in-memory modules."""
    settings = replace(model.settings, resolution=resolution, fold_text_tokens=fold)
    context = (1 if fold else settings.text_tokens) + model.reference_tokens
    metadata = {
        "resolution": resolution,
        "precision": "bf16",
        "attention": "torch sdpa",
        "fold_text_tokens": fold,
        "text_tokens": settings.text_tokens,
        "reference_tokens": model.reference_tokens,
        "context_tokens": context,
        "joint_dim": model.joint_dim,
        "reference_size": model.reference_size,
        "batch": "dynamic",
    }
    return Bundle(
        path=Path("<full preset, random weights>"),
        settings=settings,
        metadata=metadata,
        files={},
        fingerprint="random-weights",
        graphs={},
        batch=None,
    )


def _torch_modules(model) -> dict:
    """The four graphs as callables with the Bundle-format-v1 signatures (float32 in and out)."""
    import torch

    dtype = model.dtype

    def step(x, cond, ctx, key_bias, sigma, sigma_next, guidance, img_ids, txt_ids):
        v = model.velocity(x.to(dtype), cond.to(dtype), ctx.to(dtype), key_bias, sigma, guidance, img_ids, txt_ids)
        return x + (sigma_next - sigma)[:, None, None] * v.float()

    return {
        "step": step,
        "vae_encoder": lambda pixels: model.encode_images(pixels.to(dtype)).float(),
        "vae_decoder": lambda latents: model.decode_latents(latents.to(dtype)).float(),
        "image_encoder": lambda pixels: model.encode_reference(pixels.to(dtype)).to(torch.float32),
    }


def bench_gpu(args: argparse.Namespace) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise OptionError(
            "`unidg bench runtime --gpu` needs a CUDA GPU: torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}); run it on a GPU machine, or drop --gpu for the CPU comparison"
        )
    from unidg.runtime.backends.torch_backend import TorchBackend
    from unidg.train.model import UniDGModel

    resolution, steps, repeats = args.resolution, args.steps or 28, args.repeats
    device = torch.device("cuda")
    model = UniDGModel.from_preset("full", device=device, dtype=torch.bfloat16, seed=0)
    rows = []
    for fold in (True, False):
        model.settings = replace(model.settings, resolution=resolution, fold_text_tokens=fold)
        bundle = _full_preset_bundle(model, resolution, fold)
        backend = TorchBackend.from_modules(bundle, _torch_modules(model), device="cuda")
        synth = DefectSynthesizer(bundle, backend, max_batch=1)
        request = synth.check(replace(bench_request(size=resolution), steps=steps))
        synth.generate(replace(request, steps=2))  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        totals, per_step = [], []
        for _ in range(repeats):
            marks: list[float] = []
            started = time.perf_counter()
            synth.generate(request, progress=lambda step, total, marks=marks: marks.append(time.perf_counter()) or True)
            torch.cuda.synchronize()
            totals.append(time.perf_counter() - started)
            per_step.extend(np.diff(marks).tolist())  # between consecutive step callbacks: one step each
        rows.append(
            {
                "fold_text_tokens": fold,
                "tokens": bundle.context_tokens + bundle.image_tokens,
                "end_to_end_median_s": statistics.median(totals),
                "step_median_ms": 1000 * statistics.median(per_step),
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        )
    result = {
        "mode": "gpu",
        "device": torch.cuda.get_device_name(),
        "preset": "full",
        "dtype": "bf16",
        "resolution": resolution,
        "steps": steps,
        "repeats": repeats,
        "torch": torch.__version__,
        "variants": rows,
    }
    print(
        f"unidg bench runtime --gpu: {result['device']}, full preset (random weights), bf16, S={resolution}, "
        f"{steps} steps"
    )
    print(f"{'text tokens':<14} {'tokens':>7} {'per step ms':>12} {'end-to-end s':>13} {'peak GiB':>9}")
    for row in rows:
        label = "folded (1)" if row["fold_text_tokens"] else "all K"
        print(
            f"{label:<14} {row['tokens']:>7} {row['step_median_ms']:>12.1f} {row['end_to_end_median_s']:>13.2f} "
            f"{row['peak_memory_gib']:>9.1f}"
        )
    return result


def bench_runtime(args: argparse.Namespace) -> int:
    if args.gpu and args.vs_diffusers:
        raise OptionError("--gpu and --vs-diffusers are separate benchmarks; pick one")
    if args.vs_diffusers:
        result = bench_vs_diffusers(args)
    elif args.gpu:
        result = bench_gpu(args)
    else:
        if len(args.bundle or []) > 1 or len(args.threads or []) > 1:
            raise OptionError("several --bundle or --threads values need --vs-diffusers; give one of each")
        args.bundle = args.bundle[0] if args.bundle else None
        args.threads = args.threads[0] if args.threads else None
        result = bench_cpu(args)
    write_json_option(args.json, json.dumps(result, indent=2))
    return 0
