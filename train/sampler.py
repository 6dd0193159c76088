"""The torch reference sampler: the numbers every exported backend is checked against.

    inputs = prepare_diptych(model, diptych)              # cond, ctx, key bias, RoPE ids from an Alg. 1 diptych
    images = sample(model, inputs, seeds=[0])             # (B, S, 2S, 3) uint8 result diptychs
    result = sample_request(model, SynthesisRequest(reference, ref_mask, source, target_mask, seed=0))

Noise, schedule and step are the runtime's (unidg.runtime.sampler): x starts from
``numpy.random.default_rng(seed).standard_normal((N, 64))``, sigmas are ``flux_sigmas(steps, N)``, and each step is
``x <- x + (sigma_next - sigma) * v`` in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from unidg.core.attention_bias import build_key_bias
from unidg.core.geometry import Diptych, defect_token_mask, paste_back, right_half
from unidg.core.latents import model_to_pixels, pixels_to_model
from unidg.core.layout import PATCH, DiptychLayout
from unidg.runtime.sampler import initial_noise, sampling_sigmas
from unidg.runtime.step_cache import OFF, CacheDecider, StepCache
from unidg.runtime.synthesizer import SynthesisRequest, SynthesisResult, resize_reference
from unidg.train.model import UniDGModel, image_ids, unpack_latents
from unidg.train.split_transformer import transformer_head, transformer_tail, velocity_out


@dataclass
class SamplerInputs:
    """Everything constant over the denoising loop (batch B, N image tokens, C context tokens)."""

    cond: torch.Tensor  # (B, N, 320) Fill condition
    ctx: torch.Tensor  # (B, C, joint_dim) [zero text token(s) ; Redux tokens]
    key_bias: torch.Tensor  # (B, C + N) float32
    img_ids: torch.Tensor  # (N, 3)
    txt_ids: torch.Tensor  # (C, 3) zeros
    height_tokens: int
    width_tokens: int

    @property
    def image_tokens(self) -> int:
        return self.height_tokens * self.width_tokens

    @property
    def batch(self) -> int:
        return self.cond.shape[0]


def _batched(array: np.ndarray, ndim: int, name: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == ndim - 1:
        array = array[None]
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim - 1} or {ndim} dimensions, got shape {array.shape}")
    return array


@torch.no_grad()
def prepare_inputs(
    model: UniDGModel,
    diptych_image: np.ndarray,
    diptych_mask: np.ndarray,
    defect_tokens: np.ndarray | None = None,
    *,
    fold_text: bool | None = None,
    alpha: float | None = None,
) -> SamplerInputs:
    """Loop inputs from numpy diptychs: image uint8 (S, 2S, 3) or (B, S, 2S, 3), mask bool (S, 2S) or (B, S, 2S),
    defect tokens bool (N,) or (B, N) (None: no defect attention). The reference is the diptych's left half,
    resized to the image encoder's input with Pillow bicubic as in the runtime."""
    images = _batched(diptych_image, 4, "diptych image")
    masks = _batched(diptych_mask, 3, "diptych mask")
    batch, size, width, _ = images.shape
    if width != 2 * size or size % PATCH:
        raise ValueError(f"diptych image must be S x 2S with S a multiple of {PATCH}, got {size}x{width}")
    if masks.shape != (batch, size, width) or masks.dtype != np.bool_:
        raise ValueError(f"diptych mask must be bool {(batch, size, width)} to match the image, got {masks.shape}")
    height_tokens, width_tokens = DiptychLayout(size).token_hw
    if defect_tokens is None:
        defect_tokens = np.zeros((batch, height_tokens * width_tokens), dtype=bool)
    defect_tokens = np.broadcast_to(_batched(defect_tokens, 2, "defect tokens"), (batch, height_tokens * width_tokens))

    device = model.device
    pixels = torch.from_numpy(pixels_to_model(images)).to(device)
    cond = model.build_condition(pixels, torch.from_numpy(masks).to(device))
    # Resize the reference with Pillow, as the runtime does, so both feed SigLIP the same pixels.
    references = np.stack(
        [resize_reference(np.ascontiguousarray(image[:, :size]), model.reference_size) for image in images]
    )
    reference_tokens = model.encode_reference(torch.from_numpy(pixels_to_model(references)).to(device))
    ctx, txt_ids = model.context(reference_tokens, fold_text)
    fold = model.settings.fold_text_tokens if fold_text is None else fold_text
    bias = build_key_bias(
        np.ascontiguousarray(defect_tokens),
        model.reference_tokens,
        model.settings.text_tokens,
        model.settings.alpha if alpha is None else alpha,
        fold,
    )
    if bias.shape[-1] != ctx.shape[1] + height_tokens * width_tokens:
        raise ValueError(f"key bias covers {bias.shape[-1]} keys, the model sees {ctx.shape[1]} + image tokens")
    return SamplerInputs(
        cond=cond.float(),
        ctx=ctx.float(),
        key_bias=torch.from_numpy(bias).to(device),
        img_ids=image_ids(height_tokens, width_tokens, device=device),
        txt_ids=txt_ids.float(),
        height_tokens=height_tokens,
        width_tokens=width_tokens,
    )


def prepare_diptych(model: UniDGModel, diptych: Diptych, **options) -> SamplerInputs:
    """Loop inputs of one Alg. 1 diptych, with defect attention on its reference-defect and target tokens."""
    return prepare_inputs(model, diptych.image, diptych.mask, defect_token_mask(diptych), **options)


def get_noise(seeds: Sequence[int], image_tokens: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, N, 64) float32 starting latents; row b depends only on seeds[b] (the runtime's convention)."""
    return torch.from_numpy(initial_noise(seeds, image_tokens)).to(device)


@torch.no_grad()
def denoise(
    model: UniDGModel, x: torch.Tensor, inputs: SamplerInputs, sigmas: Sequence[float], guidance: float
) -> torch.Tensor:
    """Euler over the flow: x <- x + (sigma_next - sigma) * v(x, sigma), from sigmas[0] down to sigmas[-1]."""
    x = x.float()
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        v = model.velocity(x, inputs.cond, inputs.ctx, inputs.key_bias, sigma, guidance, inputs.img_ids, inputs.txt_ids)
        x = x + (float(sigma_next) - float(sigma)) * v.float()
    return x


@torch.no_grad()
def denoise_cached(
    model: UniDGModel,
    x: torch.Tensor,
    inputs: SamplerInputs,
    sigmas: Sequence[float],
    guidance: float,
    cache: StepCache,
) -> tuple[torch.Tensor, CacheDecider]:
    """``denoise`` with step caching, the runtime's decision (unidg.runtime.step_cache) over the split transformer."""
    x = x.float()
    decider = CacheDecider(cache, len(sigmas) - 1)
    tail_residual = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        head = transformer_head(
            model, x, inputs.cond, inputs.ctx, inputs.key_bias, sigma, guidance, inputs.img_ids, inputs.txt_ids
        )
        if decider.full_step(i, head.first_residual.float().cpu().numpy()):
            final = transformer_tail(model, head, inputs.key_bias)
            tail_residual = final - head.hidden
        else:
            final = head.hidden + tail_residual
        v = velocity_out(model, final, head.temb)
        x = x + (float(sigma_next) - float(sigma)) * v.float()
    return x, decider


@torch.no_grad()
def decode(model: UniDGModel, x: torch.Tensor, inputs: SamplerInputs) -> np.ndarray:
    """Packed latents (B, N, 64) -> uint8 diptych images (B, S, 2S, 3)."""
    latents = unpack_latents(x, inputs.height_tokens, inputs.width_tokens)
    return model_to_pixels(model.decode_latents(latents).float().cpu().numpy())


def sample(
    model: UniDGModel,
    inputs: SamplerInputs,
    seeds: Sequence[int],
    steps: int | None = None,
    guidance: float | None = None,
    noise: torch.Tensor | None = None,
    cache: StepCache = OFF,
) -> np.ndarray:
    """Result diptychs (B, S, 2S, 3) uint8 from seeds (or explicit noise (B, N, 64)); settings' steps/guidance
    unless given; ``cache``: step caching (off: the plain loop, bit for bit)."""
    if noise is None:
        if len(seeds) != inputs.batch:
            raise ValueError(f"{len(seeds)} seeds for a batch of {inputs.batch}; pass one seed per diptych")
        noise = get_noise(seeds, inputs.image_tokens, model.device)
    sigmas = sampling_sigmas(model.settings.steps if steps is None else steps, inputs.image_tokens)
    guidance = model.settings.guidance if guidance is None else guidance
    if cache.enabled:
        x, _ = denoise_cached(model, noise, inputs, sigmas.tolist(), guidance, cache)
    else:
        x = denoise(model, noise, inputs, sigmas.tolist(), guidance)
    return decode(model, x, inputs)


def sample_request(model: UniDGModel, request: SynthesisRequest, cache: StepCache = OFF) -> SynthesisResult:
    """One runtime request through the torch model: Alg. 1 diptych, sampling, paste-back into the source.

    The torch counterpart of ``DefectSynthesizer.generate`` (same diptych, noise, schedule and reference resize);
    steps/guidance left as None take the model's settings.
    """
    diptych = model.settings.diptych(request.reference, request.reference_mask, request.source, request.target_mask)
    inputs = prepare_diptych(model, diptych)
    result = sample(model, inputs, [request.seed], request.steps, request.guidance, cache=cache)[0]
    return SynthesisResult(
        image=paste_back(diptych, right_half(result), request.source),
        mask=diptych.dilated_mask.copy(),
        diptych=result,
        metadata={"sampler": "torch", "seed": request.seed, "name": request.name},
    )


def generate(
    model: UniDGModel,
    reference: np.ndarray,
    reference_mask: np.ndarray,
    source: np.ndarray,
    target_mask: np.ndarray,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    cache: StepCache = OFF,
) -> np.ndarray:
    """The source-sized uint8 result; pixels outside the dilated target mask are the source's, bit for bit."""
    request = SynthesisRequest(
        reference, reference_mask, source, target_mask, seed=seed, steps=steps, guidance=guidance
    )
    return sample_request(model, request, cache).image
