"""Benchmark of the biased attention: the Triton kernel vs torch SDPA (no bias, float mask, head-dim fold) and the
exact key-group form (``unidg.export.key_group_attention``: unbiased SDPA per bias level, merged by log-sum-exp).

Real shape: one FLUX step's attention at S = 768 (B = 1, H = 24, D = 128) over N = 5849 tokens (512 text + 729 Redux +
4608 image) or N = 5338 with the text tokens folded, bf16. Each variant is timed ``repeats`` times after warm-up and
the median is reported (CUDA events on a GPU). Every variant's output is compared with the float-mask SDPA output.

``tile_sweep`` adds one row per tile configuration of ``SWEEP_TILES`` (the kernel pinned to it, no autotuning):
the data for choosing ``AUTOTUNE_CONFIGS`` and the ahead-of-time default (its first entry) on a given GPU. A
configuration the GPU cannot launch (shared memory) gets a row with its error instead of a time.

On CPU the kernel can only run under Triton's interpreter, so the CPU run uses tiny shapes and proves the harness
only: its timings are not performance figures.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from unidg.export.key_group_attention import (
    contiguous_key_order,
    key_group_attention,
    key_range_attention,
    key_range_bounds,
)
from unidg.train.headdim_fold import fold_key_bias


@dataclass(frozen=True)
class TokenLayout:
    """Joint sequence [text; Redux; image]; folding keeps one text token (bias log K)."""

    text: int
    redux: int
    image: int

    def tokens(self, folded: bool) -> int:
        return (1 if folded else self.text) + self.redux + self.image


REAL_LAYOUT = TokenLayout(text=512, redux=729, image=4608)  # S = 768: 5849 tokens, 5338 folded
TINY_LAYOUT = TokenLayout(text=24, redux=16, image=30)  # 70 tokens, 47 folded
REAL_HEADS, REAL_HEAD_DIM = 24, 128
TINY_HEADS, TINY_HEAD_DIM = 2, 32
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Tile configurations of the sweep: the autotuned set plus the neighbours of the usual flash-attention optimum for
# head_dim 128 (deeper pipelines, 4 vs 8 warps, 128-wide key blocks).
SWEEP_TILES: tuple[tuple[int, int, int, int], ...] = (
    (128, 64, 8, 3),
    (128, 64, 8, 4),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 128, 8, 3),
    (128, 32, 4, 3),
    (64, 128, 4, 3),
    (64, 64, 4, 3),
    (64, 64, 4, 4),
    (64, 32, 4, 1),
)
# Every exact biased form the bench times (the unbiased SDPA row is a speed bound, not one of them).
BIASED_FORMS = (
    "triton_biased",
    "sdpa_float_mask",
    "sdpa_headdim_fold",
    "sdpa_key_groups",
    "sdpa_key_ranges",
    "flex_score_mod",
)
# Forms a CUDA graph can capture: no host synchronisation inside the call (key groups gather by the host's indices).
CAPTURABLE_FORMS = ("triton_biased", "sdpa_float_mask", "sdpa_headdim_fold", "sdpa_key_ranges", "flex_score_mod")
KEY_RANGES_NOTE = "tokens permuted once per request, 3 contiguous key ranges merged by log-sum-exp (exact, capturable)"
CPU_NOTE = (
    "CPU run under Triton's interpreter at tiny shapes: it proves the benchmark harness only; these timings are "
    "not performance figures. Run `unidg bench attention --device cuda` on a GPU for real numbers."
)


@dataclass
class BenchRow:
    variant: str
    tokens: int
    median_ms: float
    min_ms: float
    tflops: float
    vs_sdpa_no_bias: float  # median time / median time of SDPA without bias at the same token count
    max_abs_diff_vs_mask: float  # against the float-mask SDPA output
    note: str = ""


@dataclass
class BenchResult:
    device: str
    device_name: str
    dtype: str
    shape: str
    batch: int
    heads: int
    head_dim: int
    repeats: int
    interpreter: bool
    rows: list[BenchRow] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    date: str = ""
    note: str = ""
    command: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int) -> float:
    """Matmul FLOPs of one attention: QK^T and PV, 2 * 2 * B * H * S_q * S_k * D."""
    return 4.0 * batch * heads * seq_q * seq_k * head_dim


def flux_key_bias(layout: TokenLayout, folded: bool, generator: torch.Generator) -> torch.Tensor:
    """A realistic key bias [1, N]: log K on the folded text key, log 2 on ~10% of the image keys, 0 elsewhere."""
    bias = torch.zeros(1, layout.tokens(folded))
    if folded:
        bias[0, 0] = math.log(layout.text)
    context = layout.tokens(folded) - layout.image
    region = torch.rand(layout.image, generator=generator) < 0.1
    bias[0, context:][region] = math.log(2.0)
    return bias


def time_call(fn: Callable[[], object], repeats: int, warmup: int, cuda: bool) -> list[float]:
    """Milliseconds per call: CUDA events around each call on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return times


def flex_attention_call(compiled: bool) -> Callable:
    """``attention(q, k, v, key_bias)`` on FlexAttention with a ``score_mod`` that adds ``key_bias[b, kv]``.

    ``compiled``: through ``torch.compile(flex_attention)``, which generates the fused kernel (FlexAttention is only
    fast that way); otherwise its eager reference, which materialises the scores (CPU checks).
    """
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    kernel = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def attention(q, k, v, key_bias):
        def add_key_bias(score, b, h, q_idx, kv_idx):
            return score + key_bias[b, kv_idx].to(score.dtype)

        with warnings.catch_warnings():  # the eager reference warns that it is unfused: that is the point on the CPU
            warnings.simplefilter("ignore", UserWarning)
            return kernel(q, k, v, score_mod=add_key_bias)

    return attention


def _raiser(error: Exception) -> Callable:
    def call(*args, **kwargs):
        raise error

    return call


def best_biased_form(result: BenchResult, tokens: int, capturable: bool = False) -> BenchRow | None:
    """The fastest exact biased form measured at ``tokens`` (only the CUDA-graph-capturable ones if asked)."""
    forms = CAPTURABLE_FORMS if capturable else BIASED_FORMS
    rows = [r for r in result.rows if r.tokens == tokens and r.variant in forms and r.median_ms == r.median_ms]
    return min(rows, key=lambda r: r.median_ms, default=None)


def _sdpa_backends() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _best_sdpa(call: Callable[[], torch.Tensor], timer, repeats: int, warmup: int) -> tuple[list[float], str]:
    """Time ``call`` under each fused SDPA backend that accepts it; return the fastest backend's times."""
    from torch.nn.attention import sdpa_kernel

    best: tuple[list[float], str] | None = None
    for backend in _sdpa_backends():
        try:
            with sdpa_kernel(backend):
                times = timer(call, repeats, warmup)
        except RuntimeError:
            continue  # this backend does not support the inputs (e.g. flash with a float mask)
        if best is None or statistics.median(times) < statistics.median(best[0]):
            best = (times, backend.name.lower())
    if best is None:
        raise RuntimeError("no fused SDPA backend accepted the inputs")
    return best


def _check_arguments(device: str, shape: str, dtype: str, repeats: int, interpret: bool) -> bool:
    """Refuse what cannot run; returns whether the kernel runs under Triton's interpreter."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    if shape not in ("real", "tiny"):
        raise ValueError(f"shape must be real or tiny, got {shape!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    on_gpu = device == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU visible to torch; use --device cpu to check the harness")
    interpreter = interpret or not on_gpu
    if interpreter and shape == "real":
        raise ValueError("the interpreter at the real shape would run for hours; use --shape tiny or a CUDA GPU")
    return interpreter


def _biased_forms(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    layout: TokenLayout,
    on_gpu: bool,
    interpreter: bool,
    biased: Callable,
    flex: Callable,
) -> dict[str, tuple[Callable[[], torch.Tensor], str]]:
    """Every attention form at one token count, by name: the call and the note its row carries. ``biased(q, k, v,
    bias)`` is the Triton kernel, ``flex`` the FlexAttention call."""
    tokens, head_dim = q.shape[2], q.shape[3]
    mask = bias[:, None, None, :].to(q.dtype)
    q_fold, k_fold, v_fold, fold_scale = fold_key_bias(q, k, v, bias)

    def kernel(q=q, k=k, v=v, bias=bias):
        return biased(q, k, v, bias)

    def sdpa_plain(q=q, k=k, v=v):
        return F.scaled_dot_product_attention(q, k, v)

    def sdpa_mask(q=q, k=k, v=v, mask=mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def sdpa_fold(q=q_fold, k=k_fold, v=v_fold, scale=fold_scale, d=head_dim):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)[..., :d]

    def sdpa_groups(q=q, k=k, v=v, bias=bias):
        return key_group_attention(q, k, v, bias)

    # keys permuted once (a request's token permutation) so each bias level is one contiguous range
    context = tokens - layout.image
    order = torch.tensor([*range(context), *(context + i for i in contiguous_key_order(bias[0, context:].cpu()))])
    order = order.to(q.device)
    k_ranges, v_ranges, bias_ranges = k[:, :, order], v[:, :, order], bias[:, order]
    bounds = key_range_bounds(bias_ranges)

    def sdpa_ranges(q=q, k=k_ranges, v=v_ranges, bias=bias_ranges, bounds=bounds):
        return key_range_attention(q, k, v, bias, bounds)

    def flex_bias(q=q, k=k, v=v, bias=bias, flex=flex):
        return flex(q, k, v, bias)

    groups = len(torch.unique(bias[0][torch.isfinite(bias[0])]))
    on_sdpa = "cuDNN/flash" if on_gpu else "CPU flash"
    return {
        "triton_biased": (kernel, "Triton interpreter" if interpreter else "Triton, autotuned"),
        "sdpa_no_bias": (sdpa_plain, "(no bias: a speed bound, not the same output)"),
        "sdpa_float_mask": (sdpa_mask, ""),
        "sdpa_headdim_fold": (sdpa_fold, ""),
        "sdpa_key_groups": (sdpa_groups, f"{groups} key groups, {on_sdpa} with log-sum-exp, merged (exact)"),
        "sdpa_key_ranges": (
            sdpa_ranges,
            f"{KEY_RANGES_NOTE} ({'varlen flash, device-side bounds' if on_gpu else 'CPU reference per range'})",
        ),
        "flex_score_mod": (
            flex_bias,
            "FlexAttention, score_mod adds bias[kv]" + (", torch.compile'd" if on_gpu else ", eager (unfused)"),
        ),
    }


def _measure_forms(
    forms: dict[str, tuple[Callable[[], torch.Tensor], str]],
    reference: torch.Tensor,
    timer: Callable,
    repeats: int,
    warmup: int,
    on_gpu: bool,
    interpreter: bool,
    tokens: int,
    flops: float,
) -> tuple[list[BenchRow], float]:
    """One row per form (a form that fails records why) and the unbiased SDPA median every ratio divides by."""
    measured: list[tuple[str, list[float], float, str] | BenchRow] = []
    for name, (fn, note) in forms.items():
        try:
            if name.startswith("sdpa_") and name not in ("sdpa_key_groups", "sdpa_key_ranges") and on_gpu:
                times, backend = _best_sdpa(fn, timer, repeats, warmup)
                note = f"{backend} {note}".strip()
            elif name == "triton_biased":
                times = timer(fn, repeats, 1 if interpreter else warmup)
                note = note if interpreter else f"{note}: {_autotuned_choice()}"
            else:
                times = timer(fn, repeats, warmup)
                note = note or "cpu"
            diff = (fn().float() - reference).abs().max().item()
        except Exception as error:  # noqa: BLE001 - a form this torch/GPU rejects is that row's finding
            reason = f"{type(error).__name__}: {error}".splitlines()[0][:160]
            nan = float("nan")
            measured.append(BenchRow(name, tokens, nan, nan, nan, nan, nan, f"failed: {reason}"))
            continue
        measured.append((name, times, diff, note))
    unbiased = [m[1] for m in measured if isinstance(m, tuple) and m[0] == "sdpa_no_bias"]
    baseline = statistics.median(unbiased[0]) if unbiased else float("nan")
    rows = [
        entry if isinstance(entry, BenchRow) else _timed_row(entry[0], tokens, entry[1], flops, baseline, *entry[2:])
        for entry in measured
    ]
    return rows, baseline


def run_attention_bench(
    device: str = "cuda",
    shape: str = "real",
    repeats: int = 20,
    dtype: str = "bf16",
    interpret: bool = False,
    warmup: int = 3,
    seed: int = 0,
    tile_sweep: bool = False,
    sweep: tuple[tuple[int, int, int, int], ...] = SWEEP_TILES,
    all_forms: bool = True,
) -> BenchResult:
    """Time the kernel and the SDPA variants at both token counts; see the module docstring."""
    # The Triton kernel loads here, not with this module: a torch without triton still imports it (time_call).
    from unidg.export.plugins.attention_kernel import INTERPRETER_CONFIG, KernelConfig, biased_attention

    interpreter = _check_arguments(device, shape, dtype, repeats, interpret)
    on_gpu = device == "cuda"
    layout = REAL_LAYOUT if shape == "real" else TINY_LAYOUT
    heads, head_dim = (REAL_HEADS, REAL_HEAD_DIM) if shape == "real" else (TINY_HEADS, TINY_HEAD_DIM)
    torch_dtype = DTYPES[dtype]

    def timer(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
        return time_call(fn, repeats, warmup, on_gpu)

    kernel_config = INTERPRETER_CONFIG if interpreter else None

    def kernel(q, k, v, bias):
        return biased_attention(q, k, v, bias, interpret=interpreter, config=kernel_config)

    generator = torch.Generator().manual_seed(seed)
    result = BenchResult(
        device=device,
        device_name=torch.cuda.get_device_name() if on_gpu else "cpu",
        dtype=dtype,
        shape=shape,
        batch=1,
        heads=heads,
        head_dim=head_dim,
        repeats=repeats,
        interpreter=interpreter,
        versions={"torch": torch.__version__, "triton": _triton_version()},
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        note=CPU_NOTE if interpreter else "",
    )

    try:
        flex = flex_attention_call(on_gpu)
    except Exception as error:  # noqa: BLE001 - a torch without FlexAttention: its rows record why
        flex = _raiser(error)
    for folded in (False, True):
        tokens = layout.tokens(folded)
        q, k, v = (
            torch.randn(1, heads, tokens, head_dim, generator=generator).to(device=device, dtype=torch_dtype)
            for _ in range(3)
        )
        bias = flux_key_bias(layout, folded, generator).to(device)
        forms = _biased_forms(q, k, v, bias, layout, on_gpu, interpreter, kernel, flex)
        reference = forms["sdpa_float_mask"][0]().float()
        if not all_forms:  # the tile sweep alone: its rows need only the unbiased baseline
            forms = {"sdpa_no_bias": forms["sdpa_no_bias"]}
        flops = attention_flops(1, heads, tokens, tokens, head_dim)
        rows, baseline = _measure_forms(forms, reference, timer, repeats, warmup, on_gpu, interpreter, tokens, flops)
        result.rows += rows
        if tile_sweep:
            for tiles in sweep:
                config = KernelConfig(*tiles)
                result.rows.append(
                    _pinned_kernel_row(
                        config,
                        lambda c=config, q=q, k=k, v=v, b=bias: biased_attention(
                            q, k, v, b, interpret=interpreter, config=c
                        ),
                        timer,
                        repeats,
                        1 if interpreter else warmup,
                        tokens,
                        flops,
                        baseline,
                        reference,
                    )
                )
    return result


def _pinned_kernel_row(
    config,
    call: Callable[[], torch.Tensor],
    timer,
    repeats: int,
    warmup: int,
    tokens: int,
    flops: float,
    baseline: float,
    reference: torch.Tensor,
) -> BenchRow:
    """One sweep row: the kernel pinned to ``config``; a launch failure becomes the row's note."""
    try:
        times = timer(call, repeats, warmup)
        diff = (call().float() - reference).abs().max().item()
    except Exception as error:  # noqa: BLE001 - out of resources / compile errors are the figure of this row
        reason = f"{type(error).__name__}: {error}".splitlines()[0][:160]
        nan = float("nan")
        return BenchRow(f"triton {config.name}", tokens, nan, nan, nan, nan, nan, f"not launched: {reason}")
    return _timed_row(f"triton {config.name}", tokens, times, flops, baseline, diff, "pinned tile configuration")


def _timed_row(
    variant: str, tokens: int, times: list[float], flops: float, baseline: float, diff: float, note: str
) -> BenchRow:
    """A row from its timings: median, min, achieved TFLOP/s and the ratio to the unbiased SDPA median."""
    median = statistics.median(times)
    return BenchRow(
        variant=variant,
        tokens=tokens,
        median_ms=median,
        min_ms=min(times),
        tflops=flops / (median * 1e-3) / 1e12,
        vs_sdpa_no_bias=median / baseline,
        max_abs_diff_vs_mask=diff,
        note=note,
    )


def _autotuned_choice() -> str:
    """The configuration the autotuner picked for the last shape it tuned (``KernelConfig.name`` form)."""
    from unidg.runtime.attention_kernel import _autotuned_kernel

    best = getattr(_autotuned_kernel(), "best_config", None)
    if best is None:
        return "unknown"
    kwargs = best.kwargs
    return f"m{kwargs['BLOCK_M']}n{kwargs['BLOCK_N']}w{best.num_warps}s{best.num_stages}"


def _triton_version() -> str:
    import triton

    return triton.__version__


def format_table(result: BenchResult) -> str:
    header = (
        f"attention benchmark: {result.device_name} ({result.device}), {result.dtype}, B={result.batch} "
        f"H={result.heads} D={result.head_dim}, median of {result.repeats}, {result.date}, "
        f"torch {result.versions.get('torch')}, triton {result.versions.get('triton')}"
    )
    lines = [header]
    if result.command:
        lines.append(f"command: {result.command}")
    if result.note:
        lines.append(result.note)
    columns = (
        f"{'variant':<20} {'N':>6} {'median ms':>10} {'min ms':>9} {'TFLOP/s':>8} {'x no-bias':>9} "
        f"{'max|diff|':>10}  note"
    )
    lines.append(columns)
    lines.append("-" * len(columns))
    for row in result.rows:
        lines.append(
            f"{row.variant:<20} {row.tokens:>6} {row.median_ms:>10.3f} {row.min_ms:>9.3f} {row.tflops:>8.2f} "
            f"{row.vs_sdpa_no_bias:>9.2f} {row.max_abs_diff_vs_mask:>10.2e}  {row.note}"
        )
    return "\n".join(lines)


def to_json(result: BenchResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
