"""The model, the inputs and the step configurations of ``unidg bench gpu --all``, shared by every row of one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from unidg.core.latents import COND_CHANNELS, PACKED_CHANNELS
from unidg.core.layout import DiptychLayout
from unidg.core.schedule import flux_sigmas
from unidg.export.bench_attention import flex_attention_call, time_call
from unidg.export.bench_gpu_all_plan import PlanRow
from unidg.export.bench_gpu_model import compile_blocks, dry_run_preset, fused_key_bias_processor
from unidg.export.fp8_transformer import Fp8Transformer
from unidg.export.key_group_attention import contiguous_key_order, key_range_attention, key_range_bounds
from unidg.export.lowered_flux import LoweredFlux
from unidg.export.step_model import StepCachedModel, StepHeadModel, StepModel, StepTailModel
from unidg.runtime.backends.torch_step_options import GraphRunner, euler_loop, static_cache_loop
from unidg.runtime.bundle import CACHE_GRAPH_INPUTS
from unidg.train.attention import KeyBiasAttnProcessor, flux_attention_modules
from unidg.train.model import UniDGModel, unpack_latents

# The loop's arguments after (x, sigmas), as euler_loop takes them.
LOOP_CONDITIONING = ("cond", "ctx", "key_bias", "guidance", "img_ids", "txt_ids")

STOCK_ATTENTION = "stock"
BASE_ATTENTION = "sdpa_float_mask"


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


def _flex_processor(compiled: bool):
    flex = flex_attention_call(compiled)

    class FlexKeyBiasProcessor(KeyBiasAttnProcessor):
        def attention(self, query, key, value, key_bias):
            bias = key_bias.float().expand(query.shape[0], key.shape[2])
            return flex(query, key, value, bias)

    return FlexKeyBiasProcessor()


def _key_range_processor(bounds):
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
        return key_range_bounds(key_bias)

    def inputs_for(self, attention: str) -> Inputs:
        if attention == STOCK_ATTENTION:
            return self.unfolded
        return self.ranges if attention == "sdpa_key_ranges" else self.folded

    # ---------------------------------------------------------------- configuration
    def _processor(self, attention: str):
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

    def lowered_step(self) -> Callable:
        """The step as ``--backend torch`` runs it: the programs' lowered transformer (``unidg.export.lowered_flux``:
        fused projections, one modulation GEMM, key-only-mask SDPA, elementwise RoPE) with the Euler update, eager.
        Its fused weights are copies: drop the callable to free them."""
        lowered = LoweredFlux(self.model, attention="key", rope="elementwise")
        return StepModel(self.model, lowered).eval()

    def time_lowered_step(self, row: PlanRow) -> None:
        torch = self.torch
        self.use(StepConfig())
        work = self.inputs_for(BASE_ATTENTION)
        step = self.lowered_step()
        scalar = self._scalar
        args = (work.x, work.cond, work.ctx, work.key_bias, scalar(0.8), scalar(0.75), scalar(1.0))
        args += (work.img_ids, work.txt_ids)
        self.reset_peak()
        with torch.inference_mode():
            times = self.timed(lambda: step(*args), self.repeats, self.warmup)
        row.tokens = work.tokens
        row.median_ms, row.min_ms, row.peak_memory_gib = statistics.median(times), min(times), self.peak()
        row.configuration = "lowered transformer (the torch backend's step program), SDPA key-only mask, eager"
        step = None  # frees the fused weight copies
        if self.cuda:
            torch.cuda.empty_cache()

    def timed(self, fn: Callable, repeats: int, warmup: int) -> list[float]:
        return time_call(fn, repeats, warmup, self.cuda)

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> float | None:
        return round(self.torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None

    def loop_function(self, config: StepConfig, graph: bool) -> Callable:
        """``loop(x, sigmas, cond, ctx, key_bias, guidance, img_ids, txt_ids)``; captured as one CUDA graph if asked."""
        loop = euler_loop(self.step_function(config))
        return GraphRunner(loop, self.device) if graph else loop

    def sigmas(self, steps: int):
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
    def cache_loop_function(self, schedule: tuple[bool, ...], graph: bool) -> Callable:
        """``loop(x, sigmas, cond, ctx, key_bias, guidance, img_ids, txt_ids)`` over a static step-cache schedule: the
        model cut after its first block (head every step, tail on full steps, the cached step otherwise:
        ``unidg.export.step_model``), every tensor on the device; captured as one CUDA graph if asked."""
        model = self.model
        programs = {"step_head": StepHeadModel(model), "step_tail": StepTailModel(model)}
        programs["step_cached"] = StepCachedModel(model)
        loop = static_cache_loop(programs, CACHE_GRAPH_INPUTS, LOOP_CONDITIONING, schedule)
        return GraphRunner(loop, self.device) if graph else loop

    def project_sample(
        self, config: StepConfig, graph: bool, schedule: tuple[bool, ...] | None = None
    ) -> Callable[[], object]:
        """One sample, the project's way: SigLIP + Redux, VAE encode + packing, the loop, VAE decode; ``schedule``: the
        loop under that static step-cache schedule."""
        torch, model = self.torch, self.model
        self.use(config)
        ranges = config.attention == "sdpa_key_ranges"
        loop = self.loop_function(config, graph) if schedule is None else self.cache_loop_function(schedule, graph)
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
