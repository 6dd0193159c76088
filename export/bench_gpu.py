"""``unidg bench gpu``: the full-scale UniDG step on one CUDA GPU with the torch backend, one prepared command.

The full 57-block FLUX.1-Fill transformer (plus VAE, SigLIP and Redux) is built with random weights directly on the GPU
in bf16 (speed does not depend on weight values), at the UniDG workload: a 768 x 1536 diptych, 4608 image tokens and
512 zero-text + 729 Redux context tokens (5849; 5338 with the text tokens folded, the product's setting). Rows:

1. per step (folded), cumulative: bf16 eager (SDPA with the key bias as a float mask) -> ``torch.compile`` (regional:
   each transformer block, so the 57 identical blocks compile as two) -> + the fused biased attention (the project's
   Triton kernel, ``unidg::biased_attention``) -> + FP8 matmuls (``fp8_linear``: E4M3 row-wise, ``torch._scaled_mm``;
   why not torchao: see ``unidg.runtime.backends.torch_backend``) -> + the 28-step loop captured as one CUDA graph
   (``GraphRunner``, the wrapper the torch backend uses; per step = loop / 28). Also bf16 eager at 5849 (unfolded).
2. VAE encode (768 x 1536), VAE decode, the image encoder (SigLIP + Redux), and end to end per sample through the
   runtime (``DefectSynthesizer`` on the torch backend with the fastest configuration), with peak GPU memory.
3. attention alone at both token counts: the biased Triton kernel vs fused SDPA without bias (``unidg bench
   attention``'s measurement).
4. achieved vs the FLOP floor: matmuls per token (12.9 GFLOP for FLUX: see ``matmul_flops_per_token``) x tokens
   + attention 4 * N^2 * 3072 per block x 57 blocks, at the GPU's dense peak (``GPU_PEAKS``; FP8 rows count the
   matmuls at the FP8 peak and attention at the bf16 peak).

Each row that fails (a torch/Triton version that rejects a path) records its error and the others still run, so one
GPU session always yields a table. ``--dry-run`` runs every path on the CPU at a tiny size (``dry_run_preset``): FP8
emulated (the same E4M3 quantization and scales, the matmul in float32), the fused kernel under Triton's interpreter,
and the CUDA-graph wrapper without capture (CPU has no graphs: it just runs the loop on its static buffers). Its
timings prove the harness only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from unidg.core.latents import LATENT_CHANNELS
from unidg.core.layout import DiptychLayout

# (GPU name pattern, dense bf16 TFLOP/s, dense FP8 TFLOP/s or None): NVIDIA datasheet figures without sparsity.
# Checked in order; the first pattern that matches torch.cuda.get_device_name() wins.
GPU_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    (r"H100.*PCIe", 756.0, 1513.0),
    (r"H100 NVL", 835.5, 1671.0),
    (r"GH200", 989.4, 1978.9),
    (r"H200", 989.4, 1978.9),
    (r"H100", 989.4, 1978.9),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH20\b", 148.0, 296.0),
    (r"B200", 2250.0, 4500.0),
    (r"L40S", 362.0, 733.0),
    (r"\bL4\b", 121.0, 242.0),
    (r"A100", 312.0, None),
)
DRY_RUN_RESOLUTION = 32  # 8 image + 16 Redux + 1 folded text token (8 unfolded)
DRY_RUN_STEPS = 2  # each interpreted kernel call takes ~0.1-1 s on the CPU
CPU_NOTE = (
    "dry run on the CPU at a tiny size (nano preset, 1 + 1 blocks): it exercises every path of the benchmark (FP8 "
    "emulated in float32, the fused kernel under Triton's interpreter, the CUDA-graph wrapper without capture);"
    " its timings are not performance figures. Run `unidg bench gpu` on a GPU for those."
)


def dry_run_preset():
    """The nano preset cut to one double and one single block and a 32-pixel reference (16 Redux tokens): every
    path of the model at a size the Triton interpreter runs in seconds."""
    from unidg.train.presets import NANO

    return replace(
        NANO,
        name="nano-dry-run",
        transformer=replace(NANO.transformer, num_layers=1, num_single_layers=1),
        image_encoder=replace(NANO.image_encoder, image_size=32),
    )


def gpu_peaks(name: str) -> tuple[float, float | None] | None:
    """(bf16, FP8) dense TFLOP/s of a GPU by its torch name, or None when it is not in ``GPU_PEAKS``."""
    for pattern, bf16, fp8 in GPU_PEAKS:
        if re.search(pattern, name):
            return bf16, fp8
    return None


def matmul_flops_per_token(num_layers: int, num_single_layers: int, inner_dim: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs per token of the MM-DiT blocks (2 per multiply-add).

    A double block: each token uses its own stream's Q, K, V, output (4 d^2) and MLP (2 d * 4d) weights. A single
    block: fused QKV + MLP-in (d * (3d + 4d)) and proj_out ((d + 4d) * d). Per-sample matmuls (AdaLN modulation,
    embedders) are left out. FLUX (d = 3072, 19 + 38 blocks): 4.30 + 8.61 = 12.9 GFLOP per token.
    """
    mlp = int(inner_dim * mlp_ratio)
    double = 4 * inner_dim**2 + 2 * inner_dim * mlp
    single = inner_dim * (3 * inner_dim + mlp) + (inner_dim + mlp) * inner_dim
    return 2.0 * (num_layers * double + num_single_layers * single)


def attention_flops_per_step(blocks: int, tokens: int, inner_dim: int) -> float:
    """QK^T and PV over the joint sequence: 4 * N^2 * d per block (d = heads * head_dim = 3072 for FLUX)."""
    return 4.0 * blocks * tokens**2 * inner_dim


@dataclass
class Row:
    name: str
    tokens: int | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    peak_memory_gib: float | None = None
    floor_fraction: float | None = None  # FLOP-floor time / measured time
    note: str = ""
    error: str = ""


@dataclass
class GpuBenchResult:
    device: str
    device_name: str
    date: str
    dry_run: bool
    preset: str
    resolution: int
    steps: int
    repeats: int
    dtype: str = "bf16"
    versions: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)
    peaks_tflops: dict | None = None
    rows: list[Row] = field(default_factory=list)
    attention: dict | None = None
    note: str = ""
    command: str = ""
    complete: bool = False  # False while rows are still being measured (partial reports)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------------- timing
def time_call(fn: Callable, repeats: int, warmup: int, cuda: bool) -> list[float]:
    """Milliseconds per call: the attention bench's timer, imported when used (this module loads torch lazily)."""
    from unidg.export.bench_attention import time_call as timed

    return timed(fn, repeats, warmup, cuda)


# ------------------------------------------------------------------------------------------------------- model
def fused_key_bias_processor():
    """The key-bias attention processor (same projections, RoPE, token order) with its attention on the Triton
    kernel through ``fused_sdpa``, the function the torch backend's ``--fused-attention`` puts in exported graphs."""
    from unidg.runtime.backends.torch_backend import fused_sdpa
    from unidg.train.attention import KeyBiasAttnProcessor, _key_bias_mask

    class FusedKeyBiasAttnProcessor(KeyBiasAttnProcessor):
        def attention(self, query, key, value, key_bias):
            mask = None if key_bias is None else _key_bias_mask(key_bias, query.shape[0], key.shape[2], query.dtype)
            return fused_sdpa(query, key, value, attn_mask=mask)

    return FusedKeyBiasAttnProcessor()


def use_fused_attention(transformer) -> int:
    """Install the fused key-bias processor on every double and single block; returns how many."""
    from unidg.train.attention import flux_attention_modules

    processor = fused_key_bias_processor()
    modules = flux_attention_modules(transformer)
    for attn in modules:
        attn.set_processor(processor)
    return len(modules)


def compile_blocks(torch, transformer, backend: str) -> int:
    """Regional compilation: ``torch.compile`` each double and single block (identical blocks share their code)."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


@dataclass
class Workload:
    """The step inputs at one token layout, on the device (float32 like the bundle's graphs)."""

    inputs: tuple
    tokens: int
    image_tokens: int
    context_tokens: int


def make_workload(torch, model, resolution: int, fold: bool, seed: int) -> Workload:
    from unidg.train.model import image_ids

    device = model.device
    generator = torch.Generator().manual_seed(seed)
    layout = DiptychLayout(resolution)
    n_image = layout.image_tokens
    x = torch.randn(1, n_image, 64, generator=generator)
    cond = torch.randn(1, n_image, 320, generator=generator)
    redux = torch.randn(1, model.reference_tokens, model.joint_dim, generator=generator)
    defect = torch.rand(1, n_image, generator=generator) < 0.1
    with torch.inference_mode():
        ctx, txt_ids = model.context(redux, fold_text=fold)
        key_bias = model.key_bias(defect, fold_text=fold)
    img_ids = image_ids(*layout.token_hw)
    sigma, sigma_next, guidance = torch.tensor([0.8]), torch.tensor([0.75]), torch.tensor([1.0])
    inputs = (x, cond, ctx, key_bias, sigma, sigma_next, guidance, img_ids, txt_ids)
    inputs = tuple(t.to(device=device, dtype=torch.float32) for t in inputs)
    return Workload(inputs, ctx.shape[1] + n_image, n_image, ctx.shape[1])


# ------------------------------------------------------------------------------------------------------- bench
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
    """Every row of the module docstring; on the CPU (``dry_run``) at a tiny size (``dry_run_preset``), in float32
    (CPU bf16 matmuls are slow emulations), ``DRY_RUN_STEPS`` steps and one warm-up call per row.

    ``compile=False`` skips the compiled row and runs the later rows uncompiled; ``on_row(result)`` is called after
    every row with the result so far."""
    import torch

    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        raise ValueError(
            f"`unidg bench gpu` needs a CUDA GPU: torch {torch.__version__} sees none (torch.cuda.is_available() is "
            "False); run it on a GPU machine, or add --dry-run to check every path on the CPU at a tiny size"
        )
    from unidg.export.bench_runtime import _full_preset_bundle, _torch_modules, bench_request
    from unidg.runtime.backends.torch_backend import GraphRunner, TorchBackend, TorchOptions, euler_loop
    from unidg.runtime.backends.torch_backend import quantize_linear_modules as fp8_modules
    from unidg.runtime.synthesizer import DefectSynthesizer
    from unidg.train.model import UniDGModel

    steps = steps or (DRY_RUN_STEPS if dry_run else 28)
    if steps < 1 or repeats < 1:
        raise ValueError(f"--steps and --repeats must be >= 1 (got {steps}, {repeats})")
    preset = dry_run_preset() if dry_run else "full"
    resolution = resolution or (DRY_RUN_RESOLUTION if dry_run else 768)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float32 if dry_run else torch.bfloat16
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peaks = gpu_peaks(name) if cuda else None
    result = GpuBenchResult(
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
    print(
        f"unidg bench gpu: {name}, {result.preset} preset (random weights), {result.dtype}, S={resolution}", flush=True
    )
    started = time.perf_counter()
    model = UniDGModel.from_preset(preset, device=device, dtype=dtype, seed=seed)
    model.settings = replace(model.settings, resolution=resolution, fold_text_tokens=True)
    print(f"  built the model in {time.perf_counter() - started:.1f} s", flush=True)
    config = model.transformer.config
    inner = config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers + config.num_single_layers
    per_token = matmul_flops_per_token(config.num_layers, config.num_single_layers, inner)
    folded, unfolded = (make_workload(torch, model, resolution, fold, seed) for fold in (True, False))
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
            "sample": steps * (matmul + attention),
        }
    modules = _torch_modules(model)
    step = modules["step"]
    rows = result.rows
    warmup = 1 if dry_run else 2
    attempt = _reporting(rows, None if on_row is None else lambda: on_row(result))

    def reset_peak() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak() -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if cuda else None

    def measure_step(work: Workload, fp8: bool = False) -> Callable[[Row], None]:
        def measure(row: Row) -> None:
            row.tokens = work.tokens
            reset_peak()
            with torch.inference_mode():
                times = time_call(lambda: step(*work.inputs), repeats, warmup, cuda)
            row.median_ms, row.min_ms, row.peak_memory_gib = statistics.median(times), min(times), peak()
            row.floor_fraction = _floor_fraction(result, row, fp8)

        return measure

    compiled_note = f"torch.compile(backend={compile_backend!r}) of each of the {blocks} blocks"
    attempt(Row("eager, SDPA, unfolded", note="text tokens not folded"), measure_step(unfolded))
    attempt(Row("eager, SDPA"), measure_step(folded))

    def compiled(row: Row) -> None:
        torch._dynamo.reset()
        compile_blocks(torch, model.transformer, compile_backend)
        measure_step(folded)(row)

    if compile:
        attempt(Row("+ torch.compile", note=compiled_note), compiled)
    else:
        attempt(Row("+ torch.compile", note="--no-compile: later rows are not compiled"), None)

    def fused(row: Row) -> None:
        torch._dynamo.reset()
        row.note = f"Triton biased attention in {use_fused_attention(model.transformer)} blocks"
        measure_step(folded)(row)

    attempt(Row("+ fused biased attention"), fused)
    fp8_state: dict = {}

    def fp8(row: Row) -> None:
        torch._dynamo.reset()
        fp8_state["linears"] = len(fp8_modules(model.transformer))
        emulated = "" if cuda else ", matmul emulated in float32"
        row.note = f"{fp8_state['linears']} linears in E4M3, row-wise scales{emulated}"
        measure_step(folded, fp8=True)(row)

    attempt(Row("+ FP8 matmuls"), fp8)
    fp8_ok = "linears" in fp8_state

    def graph(row: Row) -> None:
        runner = GraphRunner(euler_loop(step), device)
        work = folded
        x, cond, ctx, key_bias, _, _, guidance, img_ids, txt_ids = work.inputs
        sigmas = torch.linspace(1.0, 0.0, steps + 1, device=device)
        row.tokens = work.tokens
        reset_peak()
        with torch.inference_mode():
            times = time_call(
                lambda: runner(x, sigmas, cond, ctx, key_bias, guidance, img_ids, txt_ids), repeats, 1, cuda
            )
        row.median_ms, row.min_ms, row.peak_memory_gib = (
            statistics.median(times) / steps,
            min(times) / steps,
            peak(),
        )
        row.floor_fraction = _floor_fraction(result, row, fp8_ok)
        loop = f"{steps}-step loop {statistics.median(times):.1f} ms"
        row.note = f"per step = {loop} / {steps}; " + ("one CUDA graph" if runner.captured else "CPU: not captured")

    attempt(Row(f"+ {steps}-step loop as a CUDA graph"), graph)

    # ------------------------------------------------------------------ VAE, image encoder, end to end
    layout = DiptychLayout(resolution)
    pixels = torch.rand(1, 3, *layout.pixel_hw, device=device) * 2 - 1
    latents = torch.randn(1, LATENT_CHANNELS, *layout.latent_hw, device=device)
    reference = torch.rand(1, 3, model.reference_size, model.reference_size, device=device) * 2 - 1

    def component(graph_name: str, tensor) -> Callable[[Row], None]:
        def measure(row: Row) -> None:
            reset_peak()
            with torch.inference_mode():
                times = time_call(lambda: modules[graph_name](tensor), repeats, warmup, cuda)
            row.median_ms, row.min_ms, row.peak_memory_gib = statistics.median(times), min(times), peak()

        return measure

    attempt(Row(f"VAE encode {resolution}x{2 * resolution}"), component("vae_encoder", pixels))
    attempt(Row(f"VAE decode {resolution}x{2 * resolution}"), component("vae_decoder", latents))
    attempt(Row("image encoder (SigLIP + Redux)"), component("image_encoder", reference))

    def end_to_end(row: Row) -> None:
        bundle = _full_preset_bundle(model, resolution, True)
        backend = TorchBackend.from_modules(bundle, modules, str(device), TorchOptions(cuda_graph=True))
        synth = DefectSynthesizer(bundle, backend, max_batch=1)
        request = synth.check(replace(bench_request(size=resolution), steps=steps))
        synth.generate(request)  # warm-up: captures the loop
        reset_peak()
        times = []
        for _ in range(repeats if dry_run else max(3, repeats // 2)):
            begun = time.perf_counter()
            synth.generate(request)
            if cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - begun) * 1e3)
        row.tokens = folded.tokens
        row.median_ms, row.min_ms, row.peak_memory_gib = statistics.median(times), min(times), peak()
        row.note = (
            "runtime DefectSynthesizer, torch backend, the configuration above, "
            f"{steps} steps, captured loop; wall clock incl. host work"
        )

    attempt(Row("end to end per sample"), end_to_end)

    # ------------------------------------------------------------------ attention alone
    try:
        from unidg.export.bench_attention import run_attention_bench

        attention = run_attention_bench(
            device=str(device.type),
            shape="tiny" if dry_run else "real",
            repeats=1 if dry_run else attention_repeats,
            dtype="bf16",
            interpret=dry_run,
        )
        result.attention = attention.to_dict()
    except Exception as error:
        result.attention = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:300]}
        traceback.print_exc(file=sys.stderr)
    result.complete = True
    return result


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


# ------------------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_markdown(result: GpuBenchResult) -> str:
    """The markdown table docs/performance.md records."""
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    lines = [
        f"### {result.device_name}, {result.date}"
        + (" (dry run, not figures)" if result.dry_run else "")
        + ("" if result.complete else " (incomplete: the run stopped before its last row)"),
        "",
        f"Command: `{result.command}`. {result.preset} preset (random weights), {result.dtype}, "
        f"S = {result.resolution} "
        f"({result.tokens.get('image')} image tokens; {result.tokens.get('unfolded')} tokens, "
        f"{result.tokens.get('folded')} folded), {result.steps} steps, median of {result.repeats}. {versions}.",
    ]
    if result.note:
        lines += ["", result.note]
    if result.peaks_tflops:
        lines += [
            "",
            f"Peaks used for the floor: {result.peaks_tflops['bf16']} TFLOP/s bf16, "
            f"{result.peaks_tflops['fp8']} TFLOP/s FP8 (dense).",
        ]
    lines += [
        "",
        "| row | tokens | median ms | min ms | floor / measured | peak GiB | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        note = f"FAILED: {row.error}" if row.error else row.note
        lines.append(
            f"| {row.name} | {row.tokens or '—'} | {_fmt(row.median_ms, '.2f')} | {_fmt(row.min_ms, '.2f')} | "
            f"{_fmt(row.floor_fraction, '.1%')} | {_fmt(row.peak_memory_gib, '.1f')} | {note.replace('|', '/')} |"
        )
    for tokens, flops in result.flops.items():
        lines.append(
            f"\nFLOP floor at {tokens} tokens: {flops['matmul_per_token'] / 1e9:.4g} GFLOP/token of matmuls x "
            f"{tokens} = {flops['matmul'] / 1e12:.4g} TFLOP + attention {flops['attention'] / 1e12:.4g} TFLOP = "
            f"{flops['step'] / 1e12:.4g} TFLOP per step, {flops['sample'] / 1e15:.4g} PFLOP per sample."
        )
    attention = result.attention or {}
    if attention.get("rows"):
        lines += ["", "| attention alone | N | median ms | TFLOP/s | x SDPA no bias |", "|---|---|---|---|---|"]
        for row in attention["rows"]:
            if not row["variant"].startswith("triton "):  # every form; tile-sweep rows belong to bench attention
                lines.append(
                    f"| {row['variant']} | {row['tokens']} | {row['median_ms']:.3f} | {row['tflops']:.1f} | "
                    f"{row['vs_sdpa_no_bias']:.3f} |"
                )
    elif attention.get("error"):
        lines += ["", f"attention alone: FAILED: {attention['error']}"]
    return "\n".join(lines) + "\n"


def write_report(result: GpuBenchResult, out: Path) -> tuple[Path, Path]:
    """``bench_gpu.json`` and ``bench_gpu.md`` in ``out`` (each written to a temp name, then renamed)."""
    from unidg.core.manifest import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / "bench_gpu.json", out / "bench_gpu.md"
    atomic_write_text(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
    atomic_write_text(markdown_path, format_markdown(result))
    return json_path, markdown_path


def bench_gpu(args: argparse.Namespace) -> int:
    from unidg.core.errors import OptionError

    if args.dry_run:
        # Triton reads TRITON_INTERPRET when it is first imported: the fused kernel runs on the CPU only that way.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise OptionError("triton is already imported without TRITON_INTERPRET=1; run the command in a new process")
        os.environ["TRITON_INTERPRET"] = "1"
    command = "unidg " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "unidg bench gpu"

    def report(partial: GpuBenchResult) -> None:  # after every row: a run cut short still leaves its table
        partial.command = command
        write_report(partial, Path(args.out))

    try:
        result = run_gpu_bench(
            dry_run=args.dry_run,
            resolution=args.resolution,
            steps=args.steps,
            repeats=args.repeats,
            seed=args.seed,
            compile_backend=args.compile_backend,
            compile=not args.no_compile,
            on_row=report,
        )
    except ValueError as error:
        raise OptionError(str(error)) from error
    result.command = command
    json_path, markdown_path = write_report(result, Path(args.out))
    print(format_markdown(result))
    print(f"wrote {json_path} and {markdown_path}")
    return 0
