"""``unidg bench gpu --all``: one unattended GPU session that yields the decisive table within a fixed time budget.

Everything runs in one process on one GPU with one set of random weights (the full FLUX.1-Fill + Redux preset in
bf16, S = 768). Rows run in order of value; each is written to ``bench_gpu_all.json`` and ``bench_gpu_all.md`` as it
finishes (each file written to a temp name and renamed, so both are always valid), and a row that the remaining
budget cannot hold is recorded as skipped with the reason "budget". The run first records the machine.

Rows, in the order they run (``PLAN``):

1. **stock eager step**: diffusers' ``FluxTransformer2DModel`` with its own ``FluxAttnProcessor`` and the key bias as
   an additive float ``attention_mask`` (how a diffusers user passes it), 5849 tokens (no folding), bf16. Every step
   row prints its speed-up over this row; every sample row over the stock sample.
2. **attention alone**: every exact biased form at both token counts (``unidg bench attention``'s measurement):
   cuDNN/flash SDPA with a float mask, the head-dim fold, key groups, the capturable key ranges, FlexAttention with a
   ``score_mod``, the Triton kernel. The fastest capturable form at 5338 tokens is the attention the later rows use.
3. **options, each alone against the same base** (the project's step: folded to 5338 tokens, SDPA float mask,
   eager): the measured attention winner; a CUDA graph (a short loop, per step, with and without capture); FP8
   (``Fp8Transformer``: fused Q/K/V and single-block QKV+MLP-in matmuls, modulation kept bf16, E4M3 row-wise;
   peak memory recorded with the bf16 weights moved off the GPU); ``torch.compile`` (regional, each block).
4. **the fastest combination measured**: compile + the attention winner + FP8 as one step row, then end to end per
   sample (SigLIP + Redux, VAE encode, 28 steps, VAE decode) with the fastest step configuration measured so far,
   captured as a CUDA graph where capture paid and the attention allows it; named in the row.
5. **stock end to end** per sample (same stages, diffusers' ``FlowMatchEulerDiscreteScheduler``, eager), the stock
   step compiled (``compile_repeated_blocks``), the step-caching estimate (derived, not measured: a static schedule's
   full-step fraction from a bundle manifest or ``--cache-full-steps``), the Triton tile sweep, ``unidg bench
   train``, and the shipped ONNX bundle on onnxruntime's CUDA execution provider where onnxruntime-gpu is present.

``--dry-run`` runs every row on the CPU at the tiny dry-run size (float32, FP8 emulated, the kernel interpreted, no
capture): a check of the harness, not figures.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from unidg.core.latents import COND_CHANNELS, PACKED_CHANNELS, text_ids
from unidg.core.layout import DiptychLayout
from unidg.core.manifest import atomic_write_text
from unidg.export.bench_gpu import DRY_RUN_RESOLUTION, compile_blocks, dry_run_preset, fused_key_bias_processor

DEFAULT_BUDGET_S = 420.0
JSON_NAME, MARKDOWN_NAME = "bench_gpu_all.json", "bench_gpu_all.md"
GRAPH_STEPS = 4  # the CUDA-graph option is timed on a short loop: per-step cost is what it changes
DRY_RUN_STEPS = 2
STOCK_ATTENTION = "stock"
STOCK_STEP_ROW = "stock diffusers step, eager"  # the reference of every ratio: it runs whatever --only selects
BASE_ATTENTION = "sdpa_float_mask"
# Modules of a block that FP8 leaves in bf16: AdaLN modulation (one row per sample: reading the weight is the cost,
# and a per-call dequantization would cost more than FP8 saves).
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")
CPU_NOTE = (
    "dry run on the CPU at a tiny size (nano preset cut to 1 + 1 blocks, float32): every row's code path runs (FP8 "
    "emulated, the Triton kernel interpreted, no CUDA-graph capture); the timings are not performance figures."
)


class BudgetSpent(Exception):
    """Raised inside a row when the run's time budget ends (SIGALRM)."""


class RowSkipped(Exception):
    """A row that cannot run on this machine; the message says why (e.g. onnxruntime-gpu not installed)."""


# ------------------------------------------------------------------------------------------------------- records
@dataclass
class PlanRow:
    name: str
    group: str  # step | attention | sample | derived | train | onnx
    status: str = "pending"  # pending | running | done | failed | skipped
    tokens: int | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    speedup_vs_stock: float | None = None  # stock eager time / this time (step rows: per step, sample rows: per sample)
    peak_memory_gib: float | None = None
    configuration: str = ""
    note: str = ""
    error: str = ""
    seconds: float | None = None  # wall time the row took, set-up and compilation included


@dataclass
class AllResult:
    date: str
    dry_run: bool
    budget_s: float
    preset: str
    resolution: int
    steps: int
    repeats: int
    dtype: str
    machine: dict = field(default_factory=dict)
    rows: list[PlanRow] = field(default_factory=list)
    winners: dict = field(default_factory=dict)
    attention: dict | None = None
    tile_sweep: dict | None = None
    train: dict | None = None
    elapsed_s: float = 0.0
    complete: bool = False
    note: str = ""
    command: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _version(module: str) -> str | None:
    try:
        imported = __import__(module)
    except Exception:  # noqa: BLE001 - a broken optional install is recorded as absent, not fatal
        return None
    return str(getattr(imported, "__version__", "unknown"))


def _command_output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"not available: {type(error).__name__}: {error}"
    return (done.stdout + done.stderr).strip()


def machine_record(torch) -> dict:
    """What the run ran on: nvidia-smi, the GPU as torch sees it, torch/CUDA/cuDNN/Triton versions, and which of
    tensorrt, onnxruntime(-gpu), diffusers, transformers and torchao import."""
    record: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "nvidia_smi": _command_output(["nvidia-smi"]),
        "nvidia_smi_query": _command_output(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit",
                "--format=csv",
            ]
        ),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        record["gpu"] = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "memory_gib": round(properties.total_memory / 2**30, 1),
        }
    imports = {name: _version(name) for name in ("tensorrt", "onnxruntime", "diffusers", "transformers", "torchao")}
    providers: list[str] = []
    if imports["onnxruntime"]:
        import onnxruntime  # optional: recorded above as importable

        providers = list(onnxruntime.get_available_providers())
    imports["onnxruntime_providers"] = providers
    imports["onnxruntime_gpu"] = "CUDAExecutionProvider" in providers
    record["imports"] = imports
    return record


# ------------------------------------------------------------------------------------------------------- budget
class Budget:
    """The run's time budget, counted from its start on ``clock`` (seconds)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.clock, self.started = float(seconds), clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise ``BudgetSpent`` in the main thread after ``seconds`` (POSIX main thread only; elsewhere a no-op)."""
    usable = hasattr(signal, "SIGALRM") and _is_main_thread()
    if not usable:
        yield
        return

    def stop(signum, frame):
        raise BudgetSpent(f"the time budget ran out after this row ran {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class Plan:
    """Runs rows in order within a ``Budget``; ``report()`` after every change, so the files are always current."""

    def __init__(
        self,
        result: AllResult,
        budget: Budget,
        report: Callable[[], None],
        dry_run: bool,
        only: tuple[str, ...] = (),
    ) -> None:
        self.result, self.budget, self.report, self.dry_run = result, budget, report, dry_run
        self.only = tuple(word.lower() for word in only)

    def row(self, name: str, group: str, estimate_s: float, measure: Callable[[PlanRow], None]) -> PlanRow:
        """``estimate_s``: what the row needs on a GPU (ignored in a dry run); a row that needs more than is left
        is skipped ("budget"); one still running when the budget ends is stopped and recorded as failed."""
        row = PlanRow(name, group)
        self.result.rows.append(row)
        if self.only and name != STOCK_STEP_ROW and not any(word in name.lower() for word in self.only):
            row.status, row.note = "skipped", "not selected (--only)"
            self.report()
            return row
        remaining = self.budget.remaining()
        needed = 0.0 if self.dry_run else estimate_s
        if remaining <= 0 or remaining < needed:
            row.status = "skipped"
            row.note = f"budget: needs ~{needed:.0f} s, {max(remaining, 0):.0f} s of {self.budget.seconds:.0f} s left"
            print(f"  {name}: skipped ({row.note})", flush=True)
            self.report()
            return row
        row.status = "running"
        self.report()
        started = self.budget.clock()
        try:
            with _alarm(remaining):
                measure(row)
            row.status = "done" if not row.error else "failed"
        except BudgetSpent as error:
            row.status, row.error = "failed", f"budget: {error}"
        except RowSkipped as reason:
            row.status, row.note = "skipped", str(reason)
        except Exception as error:  # one failing path (a torch/Triton version that rejects it) must not cost the rest
            row.status = "failed"
            row.error = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)
        row.seconds = round(self.budget.clock() - started, 2)
        shown = row.error or (f"{row.median_ms:.2f} ms" if row.median_ms is not None else row.note)
        if not row.error and row.speedup_vs_stock is not None:
            unit = "sample" if group in ("sample", "derived") else "step"
            shown += f" ({row.speedup_vs_stock:.2f}x the stock eager {unit})"
        print(f"  {name}: {shown}", flush=True)
        self.report()
        return row


# ------------------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class StepConfig:
    """One step configuration of the project's model (the stock rows use ``attention="stock"``)."""

    attention: str = BASE_ATTENTION
    fp8: bool = False
    compile: bool = False

    def describe(self) -> str:
        parts = [f"attention {self.attention}"]
        parts += ["FP8 (fused QKV, bf16 modulation)"] if self.fp8 else ["bf16"]
        parts += ["torch.compile per block"] if self.compile else ["eager"]
        return ", ".join(parts)


class Fp8Transformer:
    """FP8 on the transformer, the way that pays: Q/K/V of each double-block stream as one matmul, a single block's
    Q/K/V and MLP-in as one matmul, every other block linear in E4M3 (row-wise scales, ``fp8_linear``); the AdaLN
    modulation, embedders and the final layer stay bf16. Activation quantization is a per-token amax and cast right
    before each matmul, which Inductor fuses into the op that produces the activation when the blocks are compiled.

    ``apply()`` swaps the FP8 modules in and moves the bf16 originals to the host (so peak GPU memory is the FP8
    model's); ``restore()`` puts them back.
    """

    def __init__(self, transformer, torch) -> None:
        self.transformer, self.torch = transformer, torch
        self.device = next(transformer.parameters()).device
        self.active = False
        self._undo: list[Callable[[], None]] = []
        self.quantized = 0

    def _fp8(self, weight, bias):
        from unidg.runtime.backends.torch_backend import _module_fp8_linear_class

        torch = self.torch
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        linear.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.quantized += 1
        return _module_fp8_linear_class()(linear)

    def _offload(self, module) -> None:
        module.to("cpu")
        self._undo.append(lambda: module.to(self.device))

    def _swap(self, parent, attribute: str, new) -> None:
        old = getattr(parent, attribute)
        setattr(parent, attribute, new)
        old.to("cpu")

        def undo() -> None:
            setattr(parent, attribute, old.to(self.device))

        self._undo.append(undo)

    def _swap_linear(self, parent, attribute: str) -> None:
        old = getattr(parent, attribute)
        self._swap(parent, attribute, self._fp8(old.weight.detach(), None if old.bias is None else old.bias.detach()))

    def _fuse(self, owner, names: tuple[str, ...], fused_name: str):
        torch = self.torch
        parts = [getattr(owner, name) for name in names]
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        fused = self._fp8(weight, bias)
        del weight, bias
        for part in parts:
            self._offload(part)
        setattr(owner, fused_name, fused)
        self._undo.append(lambda: delattr(owner, fused_name))
        return fused

    def apply(self) -> None:
        if self.active:
            return
        try:
            self._apply()
        except BaseException:  # a failure (or the budget's alarm) half-way: put back what was swapped
            self.active = True
            self.restore()
            raise
        self.active = True

    def _apply(self) -> None:
        torch = self.torch
        with torch.no_grad():
            for block in self.transformer.transformer_blocks:
                attn = block.attn
                self._fuse(attn, ("to_q", "to_k", "to_v"), "to_qkv")
                self._fuse(attn, ("add_q_proj", "add_k_proj", "add_v_proj"), "to_added_qkv")
                self._set_fused(attn)
                self._swap_linear(attn.to_out, "0")
                self._swap_linear(attn, "to_add_out")
                for ff in (block.ff, block.ff_context):
                    self._swap_linear(ff.net[0], "proj")
                    self._swap_linear(ff.net, "2")
            for block in self.transformer.single_transformer_blocks:
                attn = block.attn
                fused = self._fuse_single(block)
                attn.to_qkv = torch.nn.Identity()  # the block hands the fused matmul's Q/K/V slice to attention
                self._undo.append(lambda attn=attn: delattr(attn, "to_qkv"))
                self._set_fused(attn)
                block.qkv_mlp = fused
                block.forward = types.MethodType(_fused_single_forward, block)
                self._undo.append(lambda block=block: (delattr(block, "forward"), delattr(block, "qkv_mlp")))
                self._swap_linear(block, "proj_out")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fuse_single(self, block):
        torch = self.torch
        attn = block.attn
        parts = [attn.to_q, attn.to_k, attn.to_v, block.proj_mlp]
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = torch.cat([p.bias.detach() for p in parts])
        fused = self._fp8(weight, bias)
        del weight, bias
        for part in parts:
            self._offload(part)
        return fused

    def _set_fused(self, attn) -> None:
        previous = getattr(attn, "fused_projections", False)
        attn.fused_projections = True
        self._undo.append(lambda: setattr(attn, "fused_projections", previous))

    def restore(self) -> None:
        if not self.active:
            return
        with self.torch.no_grad():
            while self._undo:
                self._undo.pop()()
        self.quantized = 0
        self.active = False


def _fused_single_forward(
    self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None
):
    """FluxSingleTransformerBlock.forward with Q/K/V and MLP-in as one matmul (``self.qkv_mlp``); the attention
    receives the Q/K/V slice through an identity ``to_qkv``."""
    import torch

    text_length = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    qkv_width = 3 * self.attn.inner_dim
    fused = self.qkv_mlp(norm_hidden_states)
    qkv, mlp = fused[..., :qkv_width], fused[..., qkv_width:]
    attn_output = self.attn(hidden_states=qkv, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = torch.cat([attn_output, self.act_mlp(mlp)], dim=2)
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(hidden_states)
    return hidden_states[:, :text_length], hidden_states[:, text_length:]


def _flex_processor(compiled: bool):
    from unidg.export.bench_attention import flex_attention_call
    from unidg.train.attention import KeyBiasAttnProcessor

    flex = flex_attention_call(compiled)

    class FlexKeyBiasProcessor(KeyBiasAttnProcessor):
        def attention(self, query, key, value, key_bias):
            bias = key_bias.float().expand(query.shape[0], key.shape[2])
            return flex(query, key, value, bias)

    return FlexKeyBiasProcessor()


def _key_range_processor(bounds):
    from unidg.export.key_group_attention import key_range_attention
    from unidg.train.attention import KeyBiasAttnProcessor

    class KeyRangeProcessor(KeyBiasAttnProcessor):
        """The key bias as contiguous key ranges; ``bounds`` is a static buffer updated in place per request."""

        def attention(self, query, key, value, key_bias):
            bias = key_bias.float().expand(query.shape[0], key.shape[2])
            return key_range_attention(query, key, value, bias, bounds)

    return KeyRangeProcessor()


# ------------------------------------------------------------------------------------------------------- session
@dataclass
class Inputs:
    """One request's tensors at one token layout, on the device."""

    x: object
    cond: object
    ctx: object
    key_bias: object
    img_ids: object
    txt_ids: object
    tokens: int
    order: object = None  # image-token permutation (key ranges)


class GpuSession:
    """The model, the inputs and the switches between configurations, shared by every row of one run."""

    def __init__(self, torch, dry_run: bool, resolution: int, steps: int, repeats: int, seed: int, backend: str):
        from unidg.train.model import UniDGModel

        self.torch, self.dry_run, self.steps, self.repeats, self.seed = torch, dry_run, steps, repeats, seed
        self.cuda = not dry_run
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.float32 if dry_run else torch.bfloat16
        self.compile_backend = backend
        self.warmup = 1 if dry_run else 2
        preset = dry_run_preset() if dry_run else "full"
        self.model = UniDGModel.from_preset(preset, device=self.device, dtype=self.dtype, seed=seed)
        self.model.requires_grad_(False)
        self.model.settings = replace(self.model.settings, resolution=resolution, fold_text_tokens=True)
        self.preset_name = preset if isinstance(preset, str) else preset.name
        self.resolution = resolution
        self.layout = DiptychLayout(resolution)
        self.h_tokens, self.w_tokens = self.layout.token_hw
        self.fp8 = Fp8Transformer(self.model.transformer, torch)
        self.current: StepConfig | None = None
        self.compiled = False
        self._pixels()
        self.folded = self._inputs(fold=True)
        self.unfolded = self._inputs(fold=False)
        self.ranges = self._ranged(self.folded)
        self.bounds_buffer = self._bounds(self.ranges.key_bias)
        for limit in ("cache_size_limit", "recompile_limit"):  # configurations recompile the same block code
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))

    # ---------------------------------------------------------------- inputs
    def _pixels(self) -> None:
        torch, s = self.torch, self.resolution
        generator = torch.Generator().manual_seed(self.seed + 1)
        self.diptych = (torch.rand(1, 3, *self.layout.pixel_hw, generator=generator) * 2 - 1).to(self.device)
        mask = torch.zeros(1, 1, *self.layout.pixel_hw)
        mask[..., s // 3 : s // 3 + s // 4, s + s // 2 : s + s // 2 + s // 5] = 1.0
        self.diptych_mask = mask.to(self.device)
        size = self.model.reference_size
        self.reference = (torch.rand(1, 3, size, size, generator=generator) * 2 - 1).to(self.device)
        tokens = self.layout.image_tokens
        self.defect = torch.rand(1, tokens, generator=generator) < 0.1
        self.noise = torch.randn(1, tokens, PACKED_CHANNELS, generator=generator).to(self.device)

    def _inputs(self, fold: bool) -> Inputs:
        torch, model = self.torch, self.model
        generator = torch.Generator().manual_seed(self.seed)
        n_image = self.layout.image_tokens
        with torch.inference_mode():
            x = torch.randn(1, n_image, PACKED_CHANNELS, generator=generator)
            cond = torch.randn(1, n_image, COND_CHANNELS, generator=generator)
            redux = torch.randn(1, model.reference_tokens, model.joint_dim, generator=generator)
            ctx, txt_ids = model.context(redux, fold_text=fold)
            key_bias = model.key_bias(self.defect, fold_text=fold)
        img_ids = torch.from_numpy(self.layout.image_ids())
        to = dict(device=self.device, dtype=torch.float32)
        return Inputs(
            x.to(**to),
            cond.to(**to),
            ctx.to(**to),
            key_bias.to(**to),
            img_ids.to(**to),
            txt_ids.to(**to),
            ctx.shape[1] + n_image,
        )

    def _order(self, key_bias, context: int):
        from unidg.export.key_group_attention import contiguous_key_order

        return self.torch.tensor(contiguous_key_order(key_bias[0, context:].cpu().numpy()), device=self.device)

    def _ranged(self, inputs: Inputs) -> Inputs:
        """The folded inputs with the image tokens permuted once so each bias level is one contiguous key range."""
        context = inputs.ctx.shape[1]
        order = self._order(inputs.key_bias, context)
        key_bias = self.torch.cat([inputs.key_bias[:, :context], inputs.key_bias[:, context:][:, order]], dim=1)
        return replace(
            inputs,
            x=inputs.x[:, order],
            cond=inputs.cond[:, order],
            img_ids=inputs.img_ids[order],
            key_bias=key_bias,
            order=order,
        )

    def _bounds(self, key_bias):
        from unidg.export.key_group_attention import key_range_bounds

        return key_range_bounds(key_bias)

    def inputs_for(self, attention: str) -> Inputs:
        if attention == STOCK_ATTENTION:
            return self.unfolded
        return self.ranges if attention == "sdpa_key_ranges" else self.folded

    # ---------------------------------------------------------------- configuration
    def _processor(self, attention: str):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        from unidg.train.attention import KeyBiasAttnProcessor

        if attention == STOCK_ATTENTION:
            return FluxAttnProcessor()
        if attention == "sdpa_float_mask":
            return KeyBiasAttnProcessor("sdpa")
        if attention == "sdpa_headdim_fold":
            return KeyBiasAttnProcessor("headdim_fold")
        if attention == "triton_biased":
            return fused_key_bias_processor()
        if attention == "flex_score_mod":
            return _flex_processor(compiled=self.cuda)
        if attention == "sdpa_key_ranges":
            return _key_range_processor(self.bounds_buffer)
        raise ValueError(f"no step-level form for attention {attention!r}")

    def use(self, config: StepConfig, stock_compile: bool = False) -> None:
        """Switch the model to ``config`` (processors, FP8 swap, regional compilation), changing only what differs."""
        from unidg.train.attention import flux_attention_modules

        torch = self.torch
        if self.current == config and self.compiled == (config.compile or stock_compile):
            return
        self._uncompile()
        if config.fp8 and config.attention == STOCK_ATTENTION:
            raise ValueError("the stock rows run diffusers' model as it ships: no FP8")
        if config.fp8:
            self.fp8.apply()
        else:
            self.fp8.restore()
        processor = self._processor(config.attention)
        for attn in flux_attention_modules(self.model.transformer):
            attn.set_processor(processor)
        if config.compile or stock_compile:
            torch._dynamo.reset()
            if stock_compile:
                self.model.transformer.compile_repeated_blocks(fullgraph=False, backend=self.compile_backend)
            else:
                compile_blocks(torch, self.model.transformer, self.compile_backend)
            self.compiled = True
        self.current = config

    def _uncompile(self) -> None:
        if not self.compiled:
            return
        transformer = self.model.transformer
        for block in list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks):
            block._compiled_call_impl = None  # what nn.Module.compile set
        self.torch._dynamo.reset()
        self.compiled = False

    # ---------------------------------------------------------------- calls
    def step_function(self, config: StepConfig) -> Callable:
        """``step(x, cond, ctx, key_bias, sigma, sigma_next, guidance, img_ids, txt_ids)`` -> x_next in float32."""
        model, torch = self.model, self.torch
        dtype = self.dtype
        transformer = model.transformer
        stock = config.attention == STOCK_ATTENTION

        def step(x, cond, ctx, key_bias, sigma, sigma_next, guidance, img_ids, txt_ids):
            batch = x.shape[0]
            if stock:
                kwargs = {"attention_mask": key_bias.to(dtype)[:, None, None, :]}
            else:
                kwargs = {"key_bias": key_bias}
            pooled = torch.zeros(batch, transformer.config.pooled_projection_dim, device=x.device, dtype=dtype)
            v = transformer(
                hidden_states=torch.cat([x.to(dtype), cond.to(dtype)], dim=2),
                encoder_hidden_states=ctx.to(dtype),
                pooled_projections=pooled,
                timestep=sigma.expand(batch),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance.expand(batch) if transformer.config.guidance_embeds else None,
                joint_attention_kwargs=kwargs,
                return_dict=False,
            )[0]
            return x + (sigma_next - sigma)[:, None, None] * v.float()

        return step

    def _scalar(self, value: float):
        return self.torch.tensor([value], device=self.device, dtype=self.torch.float32)

    def time_step(self, config: StepConfig, row: PlanRow, stock_compile: bool = False) -> None:
        torch = self.torch
        self.use(config, stock_compile)
        work = self.inputs_for(config.attention)
        step = self.step_function(config)
        args = (
            work.x,
            work.cond,
            work.ctx,
            work.key_bias,
            self._scalar(0.8),
            self._scalar(0.75),
            self._scalar(1.0),
            work.img_ids,
            work.txt_ids,
        )
        self.reset_peak()
        with torch.inference_mode():
            times = self.timed(lambda: step(*args), self.repeats, self.warmup)
        row.tokens = work.tokens
        row.median_ms, row.min_ms, row.peak_memory_gib = statistics.median(times), min(times), self.peak()
        row.configuration = config.describe() if not stock_compile else "diffusers stock, compile_repeated_blocks"

    def timed(self, fn: Callable, repeats: int, warmup: int) -> list[float]:
        from unidg.export.bench_attention import time_call

        return time_call(fn, repeats, warmup, self.cuda)

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def loop_function(self, config: StepConfig, graph: bool) -> Callable:
        """``loop(x, sigmas, cond, ctx, key_bias, guidance, img_ids, txt_ids)``; captured as one CUDA graph if asked."""
        from unidg.runtime.backends.torch_backend import GraphRunner, euler_loop

        loop = euler_loop(self.step_function(config))
        return GraphRunner(loop, self.device) if graph else loop

    def sigmas(self, steps: int):
        from unidg.core.schedule import flux_sigmas

        values = flux_sigmas(steps, self.layout.image_tokens)
        return self.torch.tensor(values, device=self.device)

    def time_loop(self, config: StepConfig, graph: bool, steps: int) -> tuple[list[float], bool]:
        """Milliseconds per step of a ``steps``-step loop; whether it ran as a captured graph."""
        torch = self.torch
        self.use(config)
        work = self.inputs_for(config.attention)
        loop = self.loop_function(config, graph)
        sigmas = self.sigmas(steps)
        args = (work.x, sigmas, work.cond, work.ctx, work.key_bias, self._scalar(1.0), work.img_ids, work.txt_ids)
        with torch.inference_mode():
            times = self.timed(lambda: loop(*args), max(2, self.repeats // 3), 1)
        return [t / steps for t in times], bool(getattr(loop, "captured", False))

    # ---------------------------------------------------------------- end to end
    def project_sample(self, config: StepConfig, graph: bool) -> Callable[[], object]:
        """One sample, the project's way: SigLIP + Redux, VAE encode + packing, the loop, VAE decode."""
        from unidg.train.model import unpack_latents

        torch, model = self.torch, self.model
        self.use(config)
        ranges = config.attention == "sdpa_key_ranges"
        loop = self.loop_function(config, graph)
        sigmas = self.sigmas(self.steps)
        guidance = self._scalar(float(model.settings.guidance))

        def sample():
            with torch.inference_mode():
                reference = model.encode_reference(self.reference)
                ctx, txt_ids = model.context(reference, fold_text=True)
                cond = model.build_condition(self.diptych, self.diptych_mask).float()
                key_bias = model.key_bias(self.defect.to(self.device), fold_text=True).float()
                x, img_ids = self.noise, self.folded.img_ids
                if ranges:  # once per request: tokens permuted so each bias level is a contiguous key range
                    context = ctx.shape[1]
                    order = self._order(key_bias, context)
                    x, cond, img_ids = x[:, order], cond[:, order], img_ids[order]
                    key_bias = torch.cat([key_bias[:, :context], key_bias[:, context:][:, order]], dim=1)
                    self.bounds_buffer.copy_(self._bounds(key_bias))
                x = loop(x, sigmas, cond, ctx.float(), key_bias, guidance, img_ids, txt_ids.float())
                if ranges:
                    x = torch.empty_like(x).index_copy_(1, order, x)
                latents = unpack_latents(x.to(self.dtype), self.h_tokens, self.w_tokens)
                return model.decode_latents(latents)

        return sample

    def stock_sample(self) -> Callable[[], object]:
        """One sample the stock way: the same stages, the unfolded context with the bias as a float attention mask,
        diffusers' FlowMatchEulerDiscreteScheduler stepping on the host, eager."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from unidg.core.schedule import flux_mu
        from unidg.train.model import unpack_latents

        torch, model = self.torch, self.model
        self.use(StepConfig(attention=STOCK_ATTENTION))
        transformer = model.transformer
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )
        n_image = self.layout.image_tokens
        dtype = self.dtype

        def sample():
            with torch.inference_mode():
                reference = model.encode_reference(self.reference)
                ctx, txt_ids = model.context(reference, fold_text=False)
                cond = model.build_condition(self.diptych, self.diptych_mask).to(dtype)
                mask = model.key_bias(self.defect.to(self.device), fold_text=False).to(dtype)[:, None, None, :]
                scheduler.set_timesteps(
                    sigmas=[1.0 - i / self.steps for i in range(self.steps)], mu=flux_mu(n_image), device=self.device
                )
                latents = self.noise.to(dtype)
                pooled = torch.zeros(1, transformer.config.pooled_projection_dim, device=self.device, dtype=dtype)
                guidance = torch.full((1,), float(model.settings.guidance), device=self.device)
                for t in scheduler.timesteps:
                    v = transformer(
                        hidden_states=torch.cat([latents, cond], dim=2),
                        encoder_hidden_states=ctx.to(dtype),
                        pooled_projections=pooled,
                        timestep=(t / 1000).expand(1).to(latents.dtype),
                        img_ids=self.folded.img_ids,
                        txt_ids=txt_ids,
                        guidance=guidance if transformer.config.guidance_embeds else None,
                        joint_attention_kwargs={"attention_mask": mask},
                        return_dict=False,
                    )[0]
                    latents = scheduler.step(v, t, latents, return_dict=False)[0]
                return model.decode_latents(unpack_latents(latents, self.h_tokens, self.w_tokens))

        return sample

    def time_sample(self, sample: Callable[[], object], row: PlanRow) -> None:
        torch = self.torch
        if not self.dry_run:
            sample()  # warm-up (and capture)
        self.reset_peak()
        times = []
        for _ in range(1 if self.dry_run else max(2, self.repeats // 4)):
            started = time.perf_counter()
            sample()
            if self.cuda:
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1e3)
        row.median_ms, row.min_ms, row.peak_memory_gib = statistics.median(times), min(times), self.peak()


# ------------------------------------------------------------------------------------------------------- the plan
def read_full_step_fraction(cache_full_steps: int | None, cache_manifest: str | None, steps: int) -> tuple[float, str]:
    """The fraction of a sample's steps that run the transformer in full under a static step-caching schedule, and
    where it came from: ``--cache-full-steps N`` (N of ``steps``), or the gated static schedule of a bundle manifest
    (``unidg export cache-calibrate``: metadata.step_cache.gate.static.schedule, 1 for a full step)."""
    from unidg.core.errors import OptionError

    if cache_full_steps is not None:
        if not 1 <= cache_full_steps <= steps:
            raise OptionError(
                f"--cache-full-steps must be in 1..{steps} (the steps per sample), got {cache_full_steps}"
            )
        return cache_full_steps / steps, f"--cache-full-steps {cache_full_steps} of {steps}"
    if cache_manifest is None:
        raise OptionError("no step-caching schedule given: pass --cache-full-steps N or --cache-manifest BUNDLE")
    path = Path(cache_manifest)
    path = path / "manifest.json" if path.is_dir() else path
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise OptionError(f"--cache-manifest {path}: cannot read it as JSON ({error})") from error
    entry = (manifest.get("metadata") or {}).get("step_cache") or {}
    schedule = ((entry.get("gate") or {}).get("static") or {}).get("schedule")
    if not isinstance(schedule, list) or not schedule or not all(flag in (0, 1) for flag in schedule):
        raise OptionError(
            f"--cache-manifest {path}: no gated static schedule (step_cache.gate.static.schedule); run "
            "`unidg export cache-calibrate` on the bundle, or pass --cache-full-steps N"
        )
    count, total = sum(schedule), len(schedule)
    return count / total, f"bundle manifest {path}: {count} of {total} steps in full"


def _speedup(row: PlanRow, stock: PlanRow | None) -> None:
    if stock is not None and stock.median_ms and row.median_ms:
        row.speedup_vs_stock = round(stock.median_ms / row.median_ms, 3)


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
    """Every row of the module docstring within ``budget_s`` seconds (from this call); ``report(result)`` after every
    row (and before each, with the row marked running)."""
    budget = Budget(budget_s, clock)
    import torch

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
    session_box: dict = {}

    def session() -> GpuSession:
        if "session" not in session_box:
            started = time.perf_counter()
            session_box["session"] = GpuSession(torch, dry_run, resolution, steps, repeats, seed, compile_backend)
            session_box["build_s"] = round(time.perf_counter() - started, 1)
        return session_box["session"]

    rows: dict[str, PlanRow] = {}
    step_rows: dict[StepConfig, PlanRow] = {}

    def step_row(name: str, config: StepConfig, estimate_s: float, stock_compile: bool = False) -> PlanRow:
        def measure(row: PlanRow) -> None:
            session().time_step(config, row, stock_compile)
            _speedup(row, rows.get("stock"))
            if stock_compile:
                row.note = "diffusers FluxAttnProcessor, float attention_mask, 5849 tokens, compile_repeated_blocks"

        row = plan.row(name, "step", estimate_s, measure)
        if row.status == "done" and not stock_compile:
            step_rows[config] = row
        return row

    # 1. the stock baseline
    def stock(row: PlanRow) -> None:
        s = session()
        row.note = (
            f"model built in {session_box['build_s']} s; diffusers FluxAttnProcessor, the bias as a float "
            "attention_mask, text tokens not folded"
        )
        s.time_step(StepConfig(attention=STOCK_ATTENTION), row)
        row.speedup_vs_stock = 1.0

    rows["stock"] = plan.row(STOCK_STEP_ROW, "step", 40, stock)

    # 2. attention alone: every biased form; the winner drives the later rows
    winner = {"attention": BASE_ATTENTION}

    def attention_alone(row: PlanRow) -> None:
        from unidg.export.bench_attention import REAL_LAYOUT, TINY_LAYOUT, best_biased_form, run_attention_bench

        bench = run_attention_bench(
            device="cpu" if dry_run else "cuda",
            shape="tiny" if dry_run else "real",
            repeats=1 if dry_run else 20,
            interpret=dry_run,
            warmup=1 if dry_run else 3,
        )
        result.attention = bench.to_dict()
        folded = (TINY_LAYOUT if dry_run else REAL_LAYOUT).tokens(True)
        best = best_biased_form(bench, folded, capturable=True)
        unbiased = [r for r in bench.rows if r.tokens == folded and r.variant == "sdpa_no_bias"]
        if best is None:
            raise RuntimeError("no biased attention form ran")
        winner["attention"] = best.variant
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

    rows["attention"] = plan.row("attention alone: every biased form", "attention", 45, attention_alone)

    # 3. options, each alone against the same base
    base = StepConfig()
    rows["base"] = step_row("project step, eager (base: folded, SDPA float mask)", base, 15)
    from unidg.export.bench_attention import CAPTURABLE_FORMS

    # On a GPU the winner alone (budget); the dry run checks every form's step-level path.
    alternatives = [f for f in CAPTURABLE_FORMS if f != BASE_ATTENTION] if dry_run else [winner["attention"]]
    for form in alternatives:
        if form != BASE_ATTENTION:
            step_row(f"base + attention {form}", replace(base, attention=form), 20)
    graph_gain = {"per_step": None}

    def graph_option(row: PlanRow) -> None:
        s = session()
        graph_steps = 1 if dry_run else GRAPH_STEPS
        plain, _ = s.time_loop(base, False, graph_steps)
        captured_times, captured = s.time_loop(base, True, graph_steps)
        row.tokens = s.folded.tokens
        row.median_ms, row.min_ms = statistics.median(captured_times), min(captured_times)
        graph_gain["per_step"] = statistics.median(plain) - row.median_ms
        row.configuration = base.describe() + ", CUDA graph"
        row.note = (
            f"per step of a {graph_steps}-step loop: {statistics.median(plain):.2f} ms plain, "
            f"{row.median_ms:.2f} ms {'captured' if captured else 'CPU: not captured'}"
        )
        _speedup(row, rows.get("stock"))

    rows["graph"] = plan.row("base + CUDA graph (loop)", "step", 30, graph_option)

    def fp8_option(row: PlanRow) -> None:
        s = session()
        s.time_step(replace(base, fp8=True), row)
        row.note = f"{s.fp8.quantized} FP8 matmuls; bf16 weights moved to the host while FP8 runs (peak is FP8's)"
        if dry_run:
            row.note += "; matmuls emulated in float32"
        _speedup(row, rows.get("stock"))
        step_rows[replace(base, fp8=True)] = row

    rows["fp8"] = plan.row("base + FP8 (fused QKV, bf16 modulation), eager", "step", 35, fp8_option)

    def combination() -> StepConfig:
        return StepConfig(attention=winner["attention"], fp8=True, compile=True)

    rows["combo_fp8"] = step_row("compile + attention winner + FP8", combination(), 110)

    # 4. end to end with the fastest configuration measured so far
    def fastest() -> tuple[StepConfig, bool]:
        measured = {c: r for c, r in step_rows.items() if r.median_ms is not None}
        config = min(measured, key=lambda c: measured[c].median_ms) if measured else base
        graph = bool(graph_gain["per_step"] and graph_gain["per_step"] > 0) and config.attention in CAPTURABLE_FORMS
        if dry_run:
            graph = config.attention in CAPTURABLE_FORMS  # the CPU runs the wrapper uncaptured: the path is checked
        return config, graph

    best: dict = {}

    def best_sample(row: PlanRow) -> None:
        s = session()
        config, graph = fastest()
        best.update(config=config, graph=graph)
        try:
            s.time_sample(s.project_sample(config, graph), row)
        except Exception as error:  # noqa: BLE001 - capture refused: the decisive row is still measured, uncaptured
            if not graph:
                raise
            graph = best["graph"] = False
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
        result.winners["end_to_end"] = row.configuration
        _speedup(row, rows.get("stock_sample"))

    rows["best_sample"] = plan.row("end to end per sample, fastest combination", "sample", 45, best_sample)

    def stock_sample(row: PlanRow) -> None:
        s = session()
        s.time_sample(s.stock_sample(), row)
        row.tokens = s.unfolded.tokens
        row.speedup_vs_stock = 1.0
        row.configuration = "diffusers stock: FluxAttnProcessor + float attention_mask, FlowMatchEulerDiscreteScheduler"
        row.note = f"{s.steps} steps, same stages and inputs as the project's sample, eager bf16"
        _speedup(rows["best_sample"], row)

    rows["stock_sample"] = plan.row("stock diffusers end to end per sample, eager", "sample", 40, stock_sample)

    def caching(row: PlanRow) -> None:
        fraction, source = read_full_step_fraction(cache_full_steps, cache_manifest, steps)
        sample = rows["best_sample"]
        chosen = step_rows.get(best.get("config"))
        loop_step = chosen.median_ms if chosen is not None else None
        if sample.median_ms is None or loop_step is None:
            raise RuntimeError("needs the end-to-end row and a measured step row of this run")
        row.median_ms = sample.median_ms - (1.0 - fraction) * steps * loop_step
        row.tokens = sample.tokens
        row.configuration = (sample.configuration or "") + f", step caching ({fraction:.0%} full steps)"
        row.note = (
            f"DERIVED, not measured: end to end minus the skipped steps ({source}), each counted at the combination's "
            f"step time {loop_step:.2f} ms; a cached step's residual cost is not included"
        )
        _speedup(row, rows.get("stock_sample"))

    if cache_full_steps is not None or cache_manifest is not None:
        rows["caching"] = plan.row("end to end with static step caching (derived)", "derived", 0, caching)
    else:
        skipped = PlanRow("end to end with static step caching (derived)", "derived", status="skipped")
        skipped.note = "no schedule given: --cache-full-steps N or --cache-manifest BUNDLE"
        result.rows.append(skipped)
        write()

    # 5. the stock compiled row, the remaining options alone, the sweep, training, onnxruntime
    step_row("stock diffusers step, torch.compile", StepConfig(attention=STOCK_ATTENTION), 110, stock_compile=True)
    rows["compile"] = step_row("base + torch.compile", replace(base, compile=True), 100)
    if winner["attention"] != BASE_ATTENTION:
        step_row("compile + attention winner (bf16)", StepConfig(attention=winner["attention"], compile=True), 100)

    def tile_sweep(row: PlanRow) -> None:
        from unidg.export.bench_attention import SWEEP_TILES, run_attention_bench

        bench = run_attention_bench(
            device="cpu" if dry_run else "cuda",
            shape="tiny" if dry_run else "real",
            repeats=1 if dry_run else 10,
            interpret=dry_run,
            warmup=1 if dry_run else 2,
            tile_sweep=True,
            sweep=SWEEP_TILES[:2] if dry_run else SWEEP_TILES,
            all_forms=False,
        )
        result.tile_sweep = bench.to_dict()
        pinned = [r for r in bench.rows if r.variant.startswith("triton m") and r.median_ms == r.median_ms]
        if not pinned:
            raise RuntimeError("no tile configuration launched")
        fastest_tile = min(pinned, key=lambda r: r.median_ms)
        row.tokens, row.median_ms, row.min_ms = fastest_tile.tokens, fastest_tile.median_ms, fastest_tile.min_ms
        row.configuration = fastest_tile.variant
        row.note = f"fastest of {len(pinned)} pinned tile runs ({fastest_tile.vs_sdpa_no_bias:.2f}x unbiased SDPA)"
        result.winners["triton_tile"] = fastest_tile.variant

    plan.row("attention: Triton tile sweep", "attention", 90, tile_sweep)

    def train(row: PlanRow) -> None:
        from unidg.train.bench_train import run_train_bench

        session().use(base)  # FP8 off: the training bench builds its own models
        trained = run_train_bench(dry_run=dry_run, steps=1 if dry_run else 5, warmup=0 if dry_run else 2)
        result.train = asdict(trained)
        first = trained.rows[0]
        row.tokens, row.median_ms, row.peak_memory_gib = first.tokens, first.median_ms, first.peak_memory_gib
        row.configuration, row.note = first.name, first.note + "; every row in the training table"

    plan.row("bench train: SFT step, full-width slice", "train", 90, train)

    def onnx_cuda(row: PlanRow) -> None:
        onnx_bundle_step(row, dry_run, repeats)

    plan.row("ONNX bundle step on onnxruntime (CUDA EP)", "onnx", 30, onnx_cuda)
    result.complete = True
    write()
    return result


def onnx_bundle_step(row: PlanRow, dry_run: bool, repeats: int) -> None:
    """The shipped UniDG-nano bundle's step graph on onnxruntime's CUDA execution provider (where onnxruntime-gpu is
    installed; the dry run uses the CPU provider to check the path). The nano model only: no full-size ONNX bundle
    travels to a GPU machine."""
    import numpy as np
    import onnxruntime as ort

    from unidg.runtime.backends.base import StepConditioning
    from unidg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
    from unidg.runtime.bundle import load_bundle
    from unidg.runtime.demo import DEFAULT_BUNDLE

    providers = ort.get_available_providers()
    if not dry_run and "CUDAExecutionProvider" not in providers:
        raise RowSkipped(f"onnxruntime-gpu not installed (providers: {', '.join(providers)})")
    provider = "cpu" if dry_run else "cuda"
    bundle = load_bundle(DEFAULT_BUNDLE)
    backend = OnnxRuntimeBackend.from_bundle(bundle, providers=(provider,))
    rng = np.random.default_rng(0)
    tokens, context = bundle.image_tokens, bundle.context_tokens
    conditioning = StepConditioning(
        cond=rng.standard_normal((1, tokens, COND_CHANNELS)).astype(np.float32),
        ctx=rng.standard_normal((1, context, bundle.joint_dim)).astype(np.float32),
        key_bias=np.zeros((1, context + tokens), dtype=np.float32),
        guidance=np.ones(1, dtype=np.float32),
        img_ids=bundle.layout.image_ids(),
        txt_ids=text_ids(context).astype(np.float32),
    )
    x = rng.standard_normal((1, tokens, PACKED_CHANNELS)).astype(np.float32)
    backend.step(x, conditioning, 0.8, 0.75)
    times = []
    for _ in range(1 if dry_run else repeats):
        started = time.perf_counter()
        backend.step(x, conditioning, 0.8, 0.75)
        times.append((time.perf_counter() - started) * 1e3)
    backend.close()
    row.tokens = context + tokens
    row.median_ms, row.min_ms = statistics.median(times), min(times)
    row.configuration = f"UniDG-nano bundle, {provider} execution provider"
    row.note = "the shipped nano bundle (no full-size ONNX bundle travels); host copies included"


# ------------------------------------------------------------------------------------------------------- report
def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or value != value else format(value, spec)


def format_markdown(result: AllResult) -> str:
    machine = result.machine
    gpu = machine.get("gpu", {})
    imports = machine.get("imports", {})
    title = f"### {gpu.get('name', 'CPU')}, {result.date}" + (" (dry run, not figures)" if result.dry_run else "")
    if not result.complete:
        title += " (incomplete: the run is going on or was stopped)"
    lines = [
        title,
        "",
        f"Command: `{result.command}`. {result.preset} preset (random weights), {result.dtype}, S = "
        f"{result.resolution}, {result.steps} steps, budget {result.budget_s:.0f} s, {result.elapsed_s:.0f} s used.",
        "",
        "Machine: "
        + ", ".join(
            f"{key} {machine.get(key)}" for key in ("torch", "cuda", "cudnn", "triton", "python") if key in machine
        )
        + (f"; GPU {gpu.get('name')} (sm {gpu.get('capability')}, {gpu.get('memory_gib')} GiB)" if gpu else "")
        + "; imports: "
        + ", ".join(
            f"{name} {imports.get(name) or 'no'}" for name in ("tensorrt", "onnxruntime", "diffusers", "torchao")
        )
        + f"; onnxruntime-gpu {'yes' if imports.get('onnxruntime_gpu') else 'no'}.",
    ]
    query = machine.get("nvidia_smi_query")
    if query:
        lines += ["", "nvidia-smi: `" + " / ".join(query.splitlines()) + "`"]
    if result.note:
        lines += ["", result.note]
    lines += [
        "",
        "| row | status | tokens | median ms | min ms | × stock eager | peak GiB | configuration | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        note = (f"FAILED: {row.error}" if row.error else row.note).replace("|", "/")
        ratio = "—" if row.speedup_vs_stock is None else f"{row.speedup_vs_stock:.2f}×"
        lines.append(
            f"| {row.name} | {row.status} | {row.tokens or '—'} | {_fmt(row.median_ms, '.2f')} | "
            f"{_fmt(row.min_ms, '.2f')} | {ratio} | {_fmt(row.peak_memory_gib, '.1f')} | "
            f"{row.configuration.replace('|', '/')} | {note} |"
        )
    if result.winners:
        lines += ["", "Chosen in this run: " + "; ".join(_winner_text(k, v) for k, v in result.winners.items()) + "."]
    for title_text, table in (("Attention alone", result.attention), ("Triton tile sweep", result.tile_sweep)):
        if not table:
            continue
        lines += [
            "",
            f"{title_text} (B = {table['batch']}, H = {table['heads']}, D = {table['head_dim']}, {table['dtype']}):",
            "",
            "| form | N | median ms | TFLOP/s | × SDPA no bias | max abs diff vs float mask | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in table["rows"]:
            if title_text == "Triton tile sweep" and not r["variant"].startswith("triton m"):
                continue
            lines.append(
                f"| {r['variant']} | {r['tokens']} | {_fmt(r['median_ms'], '.3f')} | {_fmt(r['tflops'], '.0f')} | "
                f"{_fmt(r['vs_sdpa_no_bias'], '.2f')} | {_fmt(r['max_abs_diff_vs_mask'], '.1e')} | "
                f"{r['note'].replace('|', '/')} |"
            )
    if result.train:
        from unidg.train.bench_train import TrainBenchResult, TrainRow
        from unidg.train.bench_train import format_markdown as train_markdown

        train = dict(result.train)
        train["rows"] = [TrainRow(**r) for r in train["rows"]]
        lines += ["", "Training (`unidg bench train`):", "", train_markdown(TrainBenchResult(**train)).strip()]
    return "\n".join(lines) + "\n"


def _winner_text(kind: str, value) -> str:
    if kind == "attention" and isinstance(value, dict):
        return (
            f"attention {value['form']} ({value['median_ms']:.3f} ms at {value['tokens']} tokens, "
            f"{value['vs_unbiased_sdpa']:.2f}x unbiased SDPA, {value['gpu']})"
        )
    return f"{kind.replace('_', ' ')}: {value}"


def write_all_report(result: AllResult, out: Path) -> tuple[Path, Path]:
    """``bench_gpu_all.json`` and ``bench_gpu_all.md`` in ``out``, each written to a temp name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / JSON_NAME, out / MARKDOWN_NAME
    atomic_write_text(json_path, json.dumps(_without_nan(result.to_dict()), indent=2, allow_nan=False) + "\n")
    atomic_write_text(markdown_path, format_markdown(result))
    return json_path, markdown_path


def _without_nan(value):
    """JSON has no NaN: a figure that does not exist (a tile configuration that did not launch) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value


def bench_gpu_all(args) -> int:
    """``unidg bench gpu --all``: ``run_all`` with its files rewritten in ``--out`` after every row."""
    from unidg.core.errors import OptionError

    if args.dry_run:
        # Triton reads TRITON_INTERPRET when it is first imported: the kernel runs on the CPU only that way.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise OptionError("triton is already imported without TRITON_INTERPRET=1; run the command in a new process")
        os.environ["TRITON_INTERPRET"] = "1"
    if args.cache_full_steps is not None or args.cache_manifest is not None:
        read_full_step_fraction(args.cache_full_steps, args.cache_manifest, args.steps or 28)  # refuse bad input first
    command = "unidg " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else "unidg bench gpu --all"
    out = Path(args.out)

    def report(partial: AllResult) -> None:
        partial.command = command
        write_all_report(partial, out)

    try:
        result = run_all(
            dry_run=args.dry_run,
            budget_s=args.budget_s,
            resolution=args.resolution,
            steps=args.steps,
            repeats=args.repeats,
            seed=args.seed,
            compile_backend=args.compile_backend,
            cache_full_steps=args.cache_full_steps,
            cache_manifest=args.cache_manifest,
            report=report,
            only=tuple(word.strip() for word in (args.only or "").split(",") if word.strip()),
        )
    except ValueError as error:
        raise OptionError(str(error)) from error
    json_path, markdown_path = write_all_report(result, out)
    print(format_markdown(result))
    print(f"wrote {json_path} and {markdown_path}")
    return 0
