"""The rows of ``unidg bench gpu`` (the list is in ``bench_gpu``'s docstring): the step configurations cumulatively,
the VAE and image encoder, end to end through the runtime, and attention alone."""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone

import torch

from unidg.core.latents import LATENT_CHANNELS
from unidg.core.layout import DiptychLayout
from unidg.export.bench_attention import run_attention_bench, time_call
from unidg.export.bench_gpu_model import (
    DRY_RUN_RESOLUTION,
    DRY_RUN_STEPS,
    Workload,
    compile_blocks,
    dry_run_preset,
    make_workload,
    use_fused_attention,
)
from unidg.export.bench_gpu_report import GpuBenchResult, Row
from unidg.export.bench_runtime import _full_preset_bundle, _torch_modules, bench_request
from unidg.export.flop_floor import attention_flops_per_step, gpu_peaks, matmul_flops_per_token
from unidg.runtime.backends.torch_backend import TorchBackend
from unidg.runtime.backends.torch_step_options import GraphRunner, TorchOptions, euler_loop
from unidg.runtime.backends.torch_step_options import quantize_linear_modules as fp8_modules
from unidg.runtime.synthesizer import DefectSynthesizer
from unidg.train.model import UniDGModel

CPU_NOTE = (
    "dry run on the CPU at a tiny size (nano preset, 1 + 1 blocks): it exercises every path of the benchmark (FP8 "
    "emulated in float32, the fused kernel under Triton's interpreter, the CUDA-graph wrapper without capture);"
    " its timings are not performance figures. Run `unidg bench gpu` on a GPU for those."
)


def _floor_fraction(result: GpuBenchResult, row: Row, fp8: bool) -> float | None:
    if row.median_ms is None or result.peaks_tflops is None or row.tokens is None:
        return None
    flops = result.flops[str(row.tokens)]
    bf16_peak, fp8_peak = result.peaks_tflops["bf16"], result.peaks_tflops["fp8"]
    matmul_peak = fp8_peak if fp8 and fp8_peak else bf16_peak
    floor_s = flops["matmul"] / (matmul_peak * 1e12) + flops["attention"] / (bf16_peak * 1e12)
    return floor_s / (row.median_ms * 1e-3)


def _attempt(rows: list[Row], row: Row, measure: Callable[[Row], None] | None) -> Row:
    """Run one row's measurement; a failure is recorded in the row (and printed) instead of ending the bench.
    ``measure=None``: the row is skipped (its note says why)."""
    if measure is None:
        rows.append(row)
        print(f"  {row.name}: skipped ({row.note})", flush=True)
        return row
    try:
        measure(row)
    except Exception as error:  # any torch/Triton failure of one path must not cost the other rows
        row.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        traceback.print_exc(file=sys.stderr)
    rows.append(row)
    print(f"  {row.name}: " + (row.error or f"{row.median_ms:.2f} ms"), flush=True)
    return row


def _reporting(rows: list[Row], report: Callable[[], None] | None) -> Callable[..., Row]:
    """``_attempt`` that hands the partial result on after every row (so a run cut short still leaves its table)."""

    def attempt(row: Row, measure: Callable[[Row], None] | None) -> Row:
        done = _attempt(rows, row, measure)
        if report is not None:
            report()
        return done

    return attempt


def _versions(torch) -> dict:
    versions = {"torch": torch.__version__, "python": sys.version.split()[0]}
    for module in ("triton", "diffusers", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = "not installed"
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    return versions


def _new_result(device, preset, resolution: int, steps: int, repeats: int) -> GpuBenchResult:
    """The result's header: the device and its peak figures, the preset, the sizes and the versions."""
    cuda = device.type == "cuda"
    dry_run = not cuda
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peaks = gpu_peaks(name) if cuda else None
    return GpuBenchResult(
        device=str(device),
        device_name=name,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        dry_run=dry_run,
        preset=preset if isinstance(preset, str) else preset.name,
        resolution=resolution,
        steps=steps,
        repeats=repeats,
        dtype="fp32" if dry_run else "bf16",
        versions=_versions(torch),
        peaks_tflops=None if peaks is None else {"bf16": peaks[0], "fp8": peaks[1]},
        note=CPU_NOTE if dry_run else ("" if peaks else f"no peak figures for {name!r} in GPU_PEAKS"),
    )


def _count_flops(result: GpuBenchResult, model: UniDGModel, folded: Workload, unfolded: Workload) -> int:
    """Record the token counts and the FLOPs per step and per sample of both layouts; returns the block count."""
    config = model.transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers + config.num_single_layers
    per_token = matmul_flops_per_token(config.num_layers, config.num_single_layers, inner)
    result.tokens = {
        "image": folded.image_tokens,
        "context_folded": folded.context_tokens,
        "context": unfolded.context_tokens,
        "folded": folded.tokens,
        "unfolded": unfolded.tokens,
    }
    for work in (folded, unfolded):
        matmul, attention = per_token * work.tokens, attention_flops_per_step(blocks, work.tokens, inner)
        result.flops[str(work.tokens)] = {
            "matmul_per_token": per_token,
            "matmul": matmul,
            "attention": attention,
            "step": matmul + attention,
            "sample": result.steps * (matmul + attention),
        }
    return blocks


class GpuBench:
    """One run's model, inputs and settings; each row method measures into the ``Row`` it gets."""

    def __init__(self, result: GpuBenchResult, model: UniDGModel, seed: int, compile_backend: str) -> None:
        self.result, self.model, self.compile_backend = result, model, compile_backend
        self.dry_run, self.steps, self.repeats = result.dry_run, result.steps, result.repeats
        self.cuda = not self.dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.warmup = 1 if self.dry_run else 2
        resolution = result.resolution
        self.folded, self.unfolded = (make_workload(torch, model, resolution, fold, seed) for fold in (True, False))
        self.blocks = _count_flops(result, model, self.folded, self.unfolded)
        self.modules = _torch_modules(model)
        self.step = self.modules["step"]
        self.fp8_linears: int | None = None

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    # ---------------------------------------------------------------- the step, cumulatively
    def measure_step(self, work: Workload, fp8: bool = False) -> Callable[[Row], None]:
        def measure(row: Row) -> None:
            row.tokens = work.tokens
            self.reset_peak()
            with torch.inference_mode():
                times = time_call(lambda: self.step(*work.inputs), self.repeats, self.warmup, self.cuda)
            row.median_ms, row.min_ms, row.peak_memory_gib = statistics.median(times), min(times), self.peak()
            row.floor_fraction = _floor_fraction(self.result, row, fp8)

        return measure

    def compiled(self, row: Row) -> None:
        torch._dynamo.reset()
        compile_blocks(torch, self.model.transformer, self.compile_backend)
        self.measure_step(self.folded)(row)

    def fused(self, row: Row) -> None:
        torch._dynamo.reset()
        row.note = f"Triton biased attention in {use_fused_attention(self.model.transformer)} blocks"
        self.measure_step(self.folded)(row)

    def fp8(self, row: Row) -> None:
        torch._dynamo.reset()
        self.fp8_linears = len(fp8_modules(self.model.transformer))
        emulated = "" if self.cuda else ", matmul emulated in float32"
        row.note = f"{self.fp8_linears} linears in E4M3, row-wise scales{emulated}"
        self.measure_step(self.folded, fp8=True)(row)

    def graph(self, row: Row) -> None:
        steps = self.steps
        runner = GraphRunner(euler_loop(self.step), self.device)
        work = self.folded
        x, cond, ctx, key_bias, _, _, guidance, img_ids, txt_ids = work.inputs
        sigmas = torch.linspace(1.0, 0.0, steps + 1, device=self.device)
        row.tokens = work.tokens
        self.reset_peak()
        with torch.inference_mode():
            times = time_call(
                lambda: runner(x, sigmas, cond, ctx, key_bias, guidance, img_ids, txt_ids), self.repeats, 1, self.cuda
            )
        row.median_ms, row.min_ms, row.peak_memory_gib = (
            statistics.median(times) / steps,
            min(times) / steps,
            self.peak(),
        )
        row.floor_fraction = _floor_fraction(self.result, row, self.fp8_linears is not None)
        loop = f"{steps}-step loop {statistics.median(times):.1f} ms"
        row.note = f"per step = {loop} / {steps}; " + ("one CUDA graph" if runner.captured else "CPU: not captured")

    # ---------------------------------------------------------------- VAE, image encoder, end to end
    def component(self, graph_name: str, tensor) -> Callable[[Row], None]:
        def measure(row: Row) -> None:
            self.reset_peak()
            with torch.inference_mode():
                times = time_call(lambda: self.modules[graph_name](tensor), self.repeats, self.warmup, self.cuda)
            row.median_ms, row.min_ms, row.peak_memory_gib = statistics.median(times), min(times), self.peak()

        return measure

    def end_to_end(self, row: Row) -> None:
        resolution, steps, repeats = self.result.resolution, self.steps, self.repeats
        bundle = _full_preset_bundle(self.model, resolution, True)
        backend = TorchBackend.from_modules(bundle, self.modules, str(self.device), TorchOptions(cuda_graph=True))
        synth = DefectSynthesizer(bundle, backend, max_batch=1)
        request = synth.check(replace(bench_request(size=resolution), steps=steps))
        synth.generate(request)  # warm-up: captures the loop
        self.reset_peak()
        times = []
        for _ in range(repeats if self.dry_run else max(3, repeats // 2)):
            begun = time.perf_counter()
            synth.generate(request)
            if self.cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - begun) * 1e3)
        row.tokens = self.folded.tokens
        row.median_ms, row.min_ms, row.peak_memory_gib = statistics.median(times), min(times), self.peak()
        row.note = (
            "runtime DefectSynthesizer, torch backend, the configuration above, "
            f"{steps} steps, captured loop; wall clock incl. host work"
        )

    def run(self, attempt: Callable[..., Row], compile: bool, attention_repeats: int) -> None:
        """Every row in order; ``attempt`` records each (a failure in its row) and reports."""
        steps, resolution = self.steps, self.result.resolution
        compiled_note = f"torch.compile(backend={self.compile_backend!r}) of each of the {self.blocks} blocks"
        attempt(Row("eager, SDPA, unfolded", note="text tokens not folded"), self.measure_step(self.unfolded))
        attempt(Row("eager, SDPA"), self.measure_step(self.folded))
        if compile:
            attempt(Row("+ torch.compile", note=compiled_note), self.compiled)
        else:
            attempt(Row("+ torch.compile", note="--no-compile: later rows are not compiled"), None)
        attempt(Row("+ fused biased attention"), self.fused)
        attempt(Row("+ FP8 matmuls"), self.fp8)
        attempt(Row(f"+ {steps}-step loop as a CUDA graph"), self.graph)

        model, device = self.model, self.device
        layout = DiptychLayout(resolution)
        pixels = torch.rand(1, 3, *layout.pixel_hw, device=device) * 2 - 1
        latents = torch.randn(1, LATENT_CHANNELS, *layout.latent_hw, device=device)
        reference = torch.rand(1, 3, model.reference_size, model.reference_size, device=device) * 2 - 1
        attempt(Row(f"VAE encode {resolution}x{2 * resolution}"), self.component("vae_encoder", pixels))
        attempt(Row(f"VAE decode {resolution}x{2 * resolution}"), self.component("vae_decoder", latents))
        attempt(Row("image encoder (SigLIP + Redux)"), self.component("image_encoder", reference))
        attempt(Row("end to end per sample"), self.end_to_end)
        self.attention_alone(attention_repeats)

    def attention_alone(self, attention_repeats: int) -> None:
        """``unidg bench attention``'s table at both token counts; a failure is recorded instead of the table."""
        try:
            attention = run_attention_bench(
                device=str(self.device.type),
                shape="tiny" if self.dry_run else "real",
                repeats=1 if self.dry_run else attention_repeats,
                dtype="bf16",
                interpret=self.dry_run,
            )
            self.result.attention = attention.to_dict()
        except Exception as error:
            self.result.attention = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
            traceback.print_exc(file=sys.stderr)


def run_gpu_bench(
    dry_run: bool = False,
    resolution: int | None = None,
    steps: int | None = None,
    repeats: int = 10,
    seed: int = 0,
    compile_backend: str = "inductor",
    attention_repeats: int = 20,
    compile: bool = True,
    on_row: Callable[[GpuBenchResult], None] | None = None,
) -> GpuBenchResult:
    """Every row of ``bench_gpu``'s docstring; on the CPU (``dry_run``) at a tiny size (``dry_run_preset``), in
    float32 (CPU bf16 matmuls are slow emulations), ``DRY_RUN_STEPS`` steps and one warm-up call per row.

    ``compile=False`` skips the compiled row and runs the later rows uncompiled; ``on_row(result)`` is called after
    every row with the result so far."""
    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        raise ValueError(
            f"`unidg bench gpu` needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is "
            "False); run it on a GPU machine, or add --dry-run to check every path on the CPU at a tiny size"
        )
    steps = steps or (DRY_RUN_STEPS if dry_run else 28)
    if steps < 1 or repeats < 1:
        raise ValueError(f"--steps and --repeats must be >= 1 (got {steps}, {repeats})")
    preset = dry_run_preset() if dry_run else "full"
    resolution = resolution or (DRY_RUN_RESOLUTION if dry_run else 768)
    device = torch.device("cuda" if cuda else "cpu")
    result = _new_result(device, preset, resolution, steps, repeats)
    print(
        f"unidg bench gpu: {result.device_name}, {result.preset} preset (random weights), {result.dtype}, "
        f"S={resolution}",
        flush=True,
    )
    started = time.perf_counter()
    dtype = torch.float32 if dry_run else torch.bfloat16
    model = UniDGModel.from_preset(preset, device=device, dtype=dtype, seed=seed)
    model.settings = replace(model.settings, resolution=resolution, fold_text_tokens=True)
    print(f"  built the model in {time.perf_counter() - started:.1f} s", flush=True)
    bench = GpuBench(result, model, seed, compile_backend)
    bench.run(_reporting(result.rows, None if on_row is None else lambda: on_row(result)), compile, attention_repeats)
    result.complete = True
    return result
