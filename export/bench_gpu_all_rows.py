"""The rows of ``unidg bench gpu --all`` in the order they run (``run_all``; the list is in ``bench_gpu_all``'s
docstring). ``AllRun`` holds what earlier rows measured that later rows read: the stock references, the attention
winner, the CUDA graph's gain, the fastest configuration."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import datetime, timezone

import torch

from unidg.export.bench_attention import (
    CAPTURABLE_FORMS,
    REAL_LAYOUT,
    SWEEP_TILES,
    TINY_LAYOUT,
    BenchResult,
    best_biased_form,
    run_attention_bench,
)
from unidg.export.bench_gpu_all_plan import STOCK_STEP_ROW, AllResult, Budget, Plan, PlanRow, record_speedup
from unidg.export.bench_gpu_all_session import BASE_ATTENTION, STOCK_ATTENTION, GpuSession, StepConfig
from unidg.export.bench_gpu_model import DRY_RUN_RESOLUTION
from unidg.export.bench_onnx_step import onnx_bundle_step
from unidg.export.machine_record import machine_record
from unidg.export.step_cache_fraction import read_static_schedule
from unidg.export.stock_diffusers import stock_sample
from unidg.train.bench_train import run_train_bench

DEFAULT_BUDGET_S = 420.0
GRAPH_STEPS = 4  # the CUDA-graph option is timed on a short loop: per-step cost is what it changes
DRY_RUN_STEPS = 2
CPU_NOTE = (
    "dry run on the CPU at a tiny size (nano preset cut to 1 + 1 blocks, float32): every row's code path runs (FP8 "
    "emulated, the Triton kernel interpreted, no CUDA-graph capture); the timings are not performance figures."
)
CACHING_ROW = "end to end with static step caching"
LOWERED_ROW = "project step, lowered (the torch backend's program form), eager"


class AllRun:
    """One run's rows over one lazily built ``GpuSession``; each row method measures into the ``PlanRow`` it gets."""

    def __init__(
        self,
        result: AllResult,
        plan: Plan,
        session_args: tuple,
        cache_full_steps: int | None,
        cache_manifest: str | None,
    ) -> None:
        self.result, self.plan, self.session_args = result, plan, session_args
        self.dry_run, self.steps, self.repeats = result.dry_run, result.steps, result.repeats
        self.cache_full_steps, self.cache_manifest = cache_full_steps, cache_manifest
        self.rows: dict[str, PlanRow] = {}
        self.step_rows: dict[StepConfig, PlanRow] = {}  # measured step configurations, the end-to-end candidates
        self.base = StepConfig()
        self.attention = BASE_ATTENTION  # the attention winner, once measured
        self.graph_gain_per_step: float | None = None
        self.best: dict = {}  # the end-to-end row's configuration and whether it ran captured
        self._session: GpuSession | None = None
        self.build_s: float | None = None

    def session(self) -> GpuSession:
        if self._session is None:
            started = time.perf_counter()
            self._session = GpuSession(torch, *self.session_args)
            self.build_s = round(time.perf_counter() - started, 1)
        return self._session

    def run(self) -> None:
        """Every row, by value: what a short budget still yields comes first."""
        plan, base = self.plan, self.base
        # 1. the stock baseline
        self.rows["stock"] = plan.row(STOCK_STEP_ROW, "step", 40, self.stock_step)
        # 2. attention alone: every biased form; the winner drives the later rows
        self.rows["attention"] = plan.row("attention alone: every biased form", "attention", 45, self.attention_alone)
        # 3. options, each alone against the same base
        self.rows["base"] = self.step_row("project step, eager (base: folded, SDPA float mask)", base, 15)
        self.rows["lowered"] = plan.row(LOWERED_ROW, "step", 25, self.lowered_step)
        # On a GPU the winner alone (budget); the dry run checks every form's step-level path.
        alternatives = [f for f in CAPTURABLE_FORMS if f != BASE_ATTENTION] if self.dry_run else [self.attention]
        for form in alternatives:
            if form != BASE_ATTENTION:
                self.step_row(f"base + attention {form}", replace(base, attention=form), 20)
        self.rows["graph"] = plan.row("base + CUDA graph (loop)", "step", 30, self.graph_option)
        self.rows["fp8"] = plan.row("base + FP8 (fused QKV, bf16 modulation), eager", "step", 35, self.fp8_option)
        combination = StepConfig(attention=self.attention, fp8=True, compile=True)
        self.rows["combo_fp8"] = self.step_row("compile + attention winner + FP8", combination, 110)
        # 4. end to end with the fastest configuration measured so far
        name = "end to end per sample, fastest combination"
        self.rows["best_sample"] = plan.row(name, "sample", 45, self.best_sample)
        name = "stock diffusers end to end per sample, eager"
        self.rows["stock_sample"] = plan.row(name, "sample", 40, self.stock_sample)
        self.caching_row()
        # 5. the stock compiled row, the remaining options alone, the sweep, training, onnxruntime
        stock = StepConfig(attention=STOCK_ATTENTION)
        self.step_row("stock diffusers step, torch.compile", stock, 110, stock_compile=True)
        self.rows["compile"] = self.step_row("base + torch.compile", replace(base, compile=True), 100)
        if self.attention != BASE_ATTENTION:
            compiled_winner = StepConfig(attention=self.attention, compile=True)
            self.step_row("compile + attention winner (bf16)", compiled_winner, 100)
        plan.row("attention: Triton tile sweep", "attention", 90, self.tile_sweep)
        plan.row("bench train: SFT step, full-width slice", "train", 90, self.train)
        plan.row("ONNX bundle step on onnxruntime (CUDA EP)", "onnx", 30, self.onnx_cuda)

    # ---------------------------------------------------------------- step rows
    def step_row(self, name: str, config: StepConfig, estimate_s: float, stock_compile: bool = False) -> PlanRow:
        def measure(row: PlanRow) -> None:
            self.session().time_step(config, row, stock_compile)
            record_speedup(row, self.rows.get("stock"))
            if stock_compile:
                row.note = "diffusers FluxAttnProcessor, float attention_mask, 5849 tokens, compile_repeated_blocks"

        row = self.plan.row(name, "step", estimate_s, measure)
        if row.status == "done" and not stock_compile:
            self.step_rows[config] = row
        return row

    def lowered_step(self, row: PlanRow) -> None:
        """The step ``--backend torch`` runs (programs traced from the lowered transformer), beside the base row."""
        self.session().time_lowered_step(row)
        record_speedup(row, self.rows.get("stock"))
        base = self.rows.get("base")
        if base is not None and base.median_ms and row.median_ms:
            row.note = f"{base.median_ms / row.median_ms:.2f}x the base row (same inputs, diffusers' forward)"

    def stock_step(self, row: PlanRow) -> None:
        s = self.session()
        row.note = (
            f"model built in {self.build_s} s; diffusers FluxAttnProcessor, the bias as a float "
            "attention_mask, text tokens not folded"
        )
        s.time_step(StepConfig(attention=STOCK_ATTENTION), row)
        row.speedup_vs_stock = 1.0

    def graph_option(self, row: PlanRow) -> None:
        s, base = self.session(), self.base
        graph_steps = 1 if self.dry_run else GRAPH_STEPS
        plain, _ = s.time_loop(base, False, graph_steps)
        captured_times, captured = s.time_loop(base, True, graph_steps)
        row.tokens = s.folded.tokens
        row.median_ms, row.min_ms = statistics.median(captured_times), min(captured_times)
        self.graph_gain_per_step = statistics.median(plain) - row.median_ms
        row.configuration = base.describe() + ", CUDA graph"
        row.note = (
            f"per step of a {graph_steps}-step loop: {statistics.median(plain):.2f} ms plain, "
            f"{row.median_ms:.2f} ms {'captured' if captured else 'CPU: not captured'}"
        )
        record_speedup(row, self.rows.get("stock"))

    def fp8_option(self, row: PlanRow) -> None:
        s = self.session()
        s.time_step(replace(self.base, fp8=True), row)
        row.note = f"{s.fp8.quantized} FP8 matmuls; bf16 weights moved to the host while FP8 runs (peak is FP8's)"
        if self.dry_run:
            row.note += "; matmuls emulated in float32"
        record_speedup(row, self.rows.get("stock"))
        self.step_rows[replace(self.base, fp8=True)] = row

    # ---------------------------------------------------------------- attention rows
    def attention_bench(self, repeats: int, warmup: int, **options) -> BenchResult:
        """``unidg bench attention``'s measurement: at the real shape on the GPU, interpreted at the tiny one on the
        CPU in a dry run (one timed call, one warm-up)."""
        dry_run = self.dry_run
        return run_attention_bench(
            device="cpu" if dry_run else "cuda",
            shape="tiny" if dry_run else "real",
            repeats=1 if dry_run else repeats,
            interpret=dry_run,
            warmup=1 if dry_run else warmup,
            **options,
        )

    def attention_alone(self, row: PlanRow) -> None:
        dry_run, result = self.dry_run, self.result
        bench = self.attention_bench(20, 3)
        result.attention = bench.to_dict()
        folded = (TINY_LAYOUT if dry_run else REAL_LAYOUT).tokens(True)
        best = best_biased_form(bench, folded, capturable=True)
        unbiased = [r for r in bench.rows if r.tokens == folded and r.variant == "sdpa_no_bias"]
        if best is None:
            raise RuntimeError("no biased attention form ran")
        self.attention = best.variant
        result.winners["attention"] = {
            "form": best.variant,
            "tokens": folded,
            "median_ms": best.median_ms,
            "vs_unbiased_sdpa": best.vs_sdpa_no_bias,
            "gpu": result.machine.get("gpu", {}).get("name", "cpu"),
        }
        row.tokens, row.median_ms, row.min_ms = folded, best.median_ms, best.min_ms
        row.configuration = f"winner: {best.variant}"
        row.note = (
            f"fastest capturable biased form at {folded} tokens, {best.vs_sdpa_no_bias:.2f}x unbiased SDPA"
            + (f" ({unbiased[0].median_ms:.3f} ms)" if unbiased else "")
            + "; every form in the attention table"
        )

    def tile_sweep(self, row: PlanRow) -> None:
        sweep = SWEEP_TILES[:2] if self.dry_run else SWEEP_TILES
        bench = self.attention_bench(10, 2, tile_sweep=True, sweep=sweep, all_forms=False)
        self.result.tile_sweep = bench.to_dict()
        pinned = [r for r in bench.rows if r.variant.startswith("triton m") and r.median_ms == r.median_ms]
        if not pinned:
            raise RuntimeError("no tile configuration launched")
        fastest_tile = min(pinned, key=lambda r: r.median_ms)
        row.tokens, row.median_ms, row.min_ms = fastest_tile.tokens, fastest_tile.median_ms, fastest_tile.min_ms
        row.configuration = fastest_tile.variant
        row.note = f"fastest of {len(pinned)} pinned tile runs ({fastest_tile.vs_sdpa_no_bias:.2f}x unbiased SDPA)"
        self.result.winners["triton_tile"] = fastest_tile.variant

    # ---------------------------------------------------------------- end-to-end rows
    def fastest(self) -> tuple[StepConfig, bool]:
        """The fastest step configuration measured so far, and whether its loop runs as a CUDA graph."""
        measured = {c: r for c, r in self.step_rows.items() if r.median_ms is not None}
        config = min(measured, key=lambda c: measured[c].median_ms) if measured else self.base
        gain = self.graph_gain_per_step
        graph = bool(gain and gain > 0) and config.attention in CAPTURABLE_FORMS
        if self.dry_run:
            graph = config.attention in CAPTURABLE_FORMS  # the CPU runs the wrapper uncaptured: the path is checked
        return config, graph

    def best_sample(self, row: PlanRow) -> None:
        s = self.session()
        config, graph = self.fastest()
        self.best.update(config=config, graph=graph)
        try:
            s.time_sample(s.project_sample(config, graph), row)
        except Exception as error:  # noqa: BLE001 - capture refused: the decisive row is still measured, uncaptured
            if not graph:
                raise
            graph = self.best["graph"] = False
            s.use(StepConfig())  # leave whatever half-captured state behind
            s.time_sample(s.project_sample(config, graph), row)
            row.error = ""
            row.note = f"CUDA graph capture failed ({type(error).__name__}: {str(error)[:120]}), measured without; "
        row.tokens = s.folded.tokens
        row.configuration = config.describe() + (", CUDA graph" if graph else "")
        row.note += (
            f"fastest step configuration measured in this run; {s.steps} steps, SigLIP + Redux, VAE encode, VAE "
            "decode, host work of the loop included (image pre/post-processing is not)"
        )
        self.result.winners["end_to_end"] = row.configuration
        record_speedup(row, self.rows.get("stock_sample"))

    def stock_sample(self, row: PlanRow) -> None:
        s = self.session()
        s.time_sample(stock_sample(s), row)
        row.tokens = s.unfolded.tokens
        row.speedup_vs_stock = 1.0
        row.configuration = "diffusers stock: FluxAttnProcessor + float attention_mask, FlowMatchEulerDiscreteScheduler"
        row.note = f"{s.steps} steps, same stages and inputs as the project's sample, eager bf16"
        record_speedup(self.rows["best_sample"], row)

    def caching_row(self) -> None:
        """The step-caching row where a schedule was given; otherwise recorded as skipped, saying how to give one."""
        if self.cache_full_steps is not None or self.cache_manifest is not None:
            self.rows["caching"] = self.plan.row(CACHING_ROW, "sample", 45, self.caching)
            return
        skipped = PlanRow(CACHING_ROW, "sample", status="skipped")
        skipped.note = "no schedule given: --cache-full-steps N or --cache-manifest BUNDLE"
        self.result.rows.append(skipped)
        self.plan.report()

    def caching(self, row: PlanRow) -> None:
        """The end-to-end row's configuration under a static step-cache schedule, measured: head every step, tail on
        full steps, the cached step otherwise, every tensor on the device (one CUDA graph where the end-to-end row
        was captured)."""
        s = self.session()
        schedule, source = read_static_schedule(self.cache_full_steps, self.cache_manifest, self.steps)
        if not self.best:
            raise RuntimeError("needs the end-to-end row of this run (its configuration)")
        config, graph = self.best["config"], self.best["graph"]
        try:
            s.time_sample(s.project_sample(config, graph, schedule), row)
        except Exception as error:  # noqa: BLE001 - capture refused: measured uncaptured, as the end-to-end row does
            if not graph:
                raise
            graph = False
            s.use(StepConfig())
            s.time_sample(s.project_sample(config, graph, schedule), row)
            row.error = ""
            row.note = f"CUDA graph capture failed ({type(error).__name__}: {str(error)[:120]}), measured without; "
        row.tokens = s.folded.tokens
        row.configuration = config.describe() + (", CUDA graph" if graph else "") + f", static step cache ({source})"
        row.note += (
            f"measured: {sum(schedule)} of {len(schedule)} steps run the transformer in full, the others its first "
            "block and the output stage on the kept tail residual (First-Block Cache, docs/step-cache.md); random "
            "weights, so the schedule is taken as given, not gated here"
        )
        record_speedup(row, self.rows.get("stock_sample"))

    # ---------------------------------------------------------------- other stages
    def train(self, row: PlanRow) -> None:
        self.session().use(self.base)  # FP8 off: the training bench builds its own models
        dry_run = self.dry_run
        trained = run_train_bench(dry_run=dry_run, steps=1 if dry_run else 5, warmup=0 if dry_run else 2)
        self.result.train = asdict(trained)
        first = trained.rows[0]
        row.tokens, row.median_ms, row.peak_memory_gib = first.tokens, first.median_ms, first.peak_memory_gib
        row.configuration, row.note = first.name, first.note + "; every row in the training table"

    def onnx_cuda(self, row: PlanRow) -> None:
        onnx_bundle_step(row, self.dry_run, self.repeats)


def run_all(
    dry_run: bool = False,
    budget_s: float = DEFAULT_BUDGET_S,
    resolution: int | None = None,
    steps: int | None = None,
    repeats: int = 10,
    seed: int = 0,
    compile_backend: str = "inductor",
    cache_full_steps: int | None = None,
    cache_manifest: str | None = None,
    report: Callable[[AllResult], None] | None = None,
    only: tuple[str, ...] = (),
    clock: Callable[[], float] = time.monotonic,
) -> AllResult:
    """Every row of ``bench_gpu_all``'s docstring within ``budget_s`` seconds (from this call); ``report(result)``
    after every row (and before each, with the row marked running)."""
    budget = Budget(budget_s, clock)
    if not dry_run and not torch.cuda.is_available():
        raise ValueError(
            f"`unidg bench gpu --all` needs a CUDA GPU: torch {torch.__version__} sees none; run it on a GPU machine, "
            "or add --dry-run to check every row on the CPU at a tiny size"
        )
    steps = steps or (DRY_RUN_STEPS if dry_run else 28)
    resolution = resolution or (DRY_RUN_RESOLUTION if dry_run else 768)
    if steps < 1 or repeats < 1 or budget_s <= 0:
        raise ValueError(f"--steps, --repeats and --budget-s must be positive (got {steps}, {repeats}, {budget_s})")
    result = AllResult(
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        dry_run=dry_run,
        budget_s=budget_s,
        preset="nano-dry-run" if dry_run else "full",
        resolution=resolution,
        steps=steps,
        repeats=repeats,
        dtype="fp32" if dry_run else "bf16",
        note=CPU_NOTE if dry_run else "",
    )

    def write() -> None:
        result.elapsed_s = round(budget.elapsed(), 1)
        if report is not None:
            report(result)

    result.machine = machine_record(torch)
    write()
    print(
        f"unidg bench gpu --all: {result.machine.get('gpu', {}).get('name', 'cpu')}, budget {budget_s:.0f} s",
        flush=True,
    )
    plan = Plan(result, budget, write, dry_run, only)
    session_args = (dry_run, resolution, steps, repeats, seed, compile_backend)
    AllRun(result, plan, session_args, cache_full_steps, cache_manifest).run()
    result.complete = True
    write()
    return result
