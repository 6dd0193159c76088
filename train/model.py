"""UniDGModel: FLUX.1-Fill transformer + FLUX VAE + SigLIP/Redux reference encoder, in the Fill token layout.

Everything the trainer, the exporter and the reference sampler need, in one place:

    model = UniDGModel.from_preset("nano")
    cond = model.build_condition(diptych_pixels, diptych_mask)      # (B, N, 320) masked latents 64 + mask 256
    ctx, txt_ids = model.context(model.encode_reference(ref_pixels))  # [K zero text tokens (or 1 folded); Redux]
    # UniDG-Text: model.context(reference, fold_text=False, text_states=t5_hidden) and velocity(..., pooled=clip)
    v = model.velocity(x, cond, ctx, key_bias, sigma, guidance, img_ids, txt_ids)  # (B, N, 64)

Pixels are NCHW float in [-1, 1]; latents are normalized ``(z - shift) * scale``; token order is [context; image].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from unidg.core.attention_bias import build_key_bias
from unidg.core.errors import UniDGError
from unidg.core.latents import COND_CHANNELS as CONDITION_CHANNELS
from unidg.core.latents import LATENT_CHANNELS, MASK_CHANNELS, PACKED_CHANNELS
from unidg.core.settings import UniDGSettings
from unidg.train.attention import install_key_bias_processor
from unidg.train.presets import TRANSFORMER_IN_CHANNELS, UniDGPreset, get_preset

# SiglipImageProcessor of so400m: rescale to [0, 1], then (x - 0.5) / 0.5, i.e. back to [-1, 1].
SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5
COMPONENTS = ("transformer", "vae", "image_encoder", "redux")


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C), channel c*4 + dy*2 + dx (diffusers FluxPipeline._pack_latents)."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"latents of shape {tuple(latents.shape)}: height and width must be even to pack 2x2")
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height_tokens: int, width_tokens: int) -> torch.Tensor:
    """(B, h_t*w_t, 4C) -> (B, C, 2 h_t, 2 w_t); inverse of pack_latents."""
    batch, count, channels = tokens.shape
    if count != height_tokens * width_tokens or channels % 4:
        raise ValueError(f"tokens of shape {tuple(tokens.shape)} do not form a {height_tokens}x{width_tokens} grid")
    tokens = tokens.view(batch, height_tokens, width_tokens, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(batch, channels // 4, height_tokens * 2, width_tokens * 2)


def pack_mask(mask: torch.Tensor, vae_scale_factor: int = 8) -> torch.Tensor:
    """Pixel mask (B, 1, H, W) or (B, H, W) -> (B, N, 256): FluxFillPipeline.prepare_mask_latents' layout.

    Each latent pixel takes its 8x8 pixel block as 64 channels (dy*8 + dx), then the 2x2 packing as for latents.
    """
    if mask.ndim == 4:
        mask = mask[:, 0]
    batch, height, width = mask.shape
    f = vae_scale_factor
    if height % (2 * f) or width % (2 * f):
        raise ValueError(f"mask of size {height}x{width}: height and width must be multiples of {2 * f}")
    mask = mask.reshape(batch, height // f, f, width // f, f).permute(0, 2, 4, 1, 3)
    return pack_latents(mask.reshape(batch, f * f, height // f, width // f))


def image_ids(height_tokens: int, width_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(h_t * w_t, 3) RoPE positions [0, row, col], row-major."""
    rows = torch.arange(height_tokens, device=device, dtype=dtype)[:, None].expand(height_tokens, width_tokens)
    cols = torch.arange(width_tokens, device=device, dtype=dtype)[None, :].expand(height_tokens, width_tokens)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


@contextlib.contextmanager
def _construction(device: str | torch.device, dtype: torch.dtype, seed: int | None) -> Iterator[None]:
    """Build modules directly on ``device`` in ``dtype`` (no fp32 copy of 12B weights), with a private RNG seed."""
    device = torch.device(device)
    previous_dtype = torch.get_default_dtype()
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device:
        if seed is not None:
            torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous_dtype)


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


class UniDGModel(nn.Module):
    """The four networks of UniDG plus its settings; ``forward`` is ``velocity``."""

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        vae: AutoencoderKL,
        image_encoder: SiglipVisionModel,
        redux: ReduxImageEncoder,
        settings: UniDGSettings | None = None,
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        config = transformer.config
        if config.in_channels != TRANSFORMER_IN_CHANNELS or (config.out_channels or 0) != PACKED_CHANNELS:
            raise ValueError(
                f"transformer has in/out channels {config.in_channels}/{config.out_channels}; the Fill layout needs "
                f"{TRANSFORMER_IN_CHANNELS}/{PACKED_CHANNELS} (load FLUX.1-Fill, not FLUX.1-dev)"
            )
        if vae.config.latent_channels != LATENT_CHANNELS:
            raise ValueError(f"VAE has {vae.config.latent_channels} latent channels; FLUX needs {LATENT_CHANNELS}")
        if redux.config.redux_dim != image_encoder.config.hidden_size:
            raise ValueError("Redux redux_dim does not match the image encoder's hidden_size")
        if redux.config.txt_in_features != config.joint_attention_dim:
            raise ValueError("Redux txt_in_features does not match the transformer's joint_attention_dim")
        self.transformer = transformer
        self.vae = vae
        self.image_encoder = image_encoder
        self.redux = redux
        self.settings = settings or UniDGSettings()
        install_key_bias_processor(transformer, attention_backend)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_preset(
        cls,
        preset: str | UniDGPreset,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int | None = 0,
        settings: UniDGSettings | None = None,
    ) -> UniDGModel:
        """Randomly initialised model of a preset's shape. ``device="meta"`` allocates nothing (shapes only)."""
        preset = get_preset(preset)
        with _construction(device, dtype, seed):
            transformer = FluxTransformer2DModel(**preset.transformer.config())
            vae = AutoencoderKL(**preset.vae.config())
            image_encoder = SiglipVisionModel(SiglipVisionConfig(**preset.image_encoder.config()))
            redux = ReduxImageEncoder(**preset.redux.config())
        return cls(transformer, vae, image_encoder, redux, settings or preset.settings).eval()

    # ---------------------------------------------------------------- shapes
    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def joint_dim(self) -> int:
        return self.transformer.config.joint_attention_dim

    @property
    def reference_size(self) -> int:
        """Side the reference is resized to before SigLIP (384 for so400m)."""
        return self.image_encoder.config.image_size

    @property
    def reference_tokens(self) -> int:
        """R: Redux tokens per reference image."""
        return (self.image_encoder.config.image_size // self.image_encoder.config.patch_size) ** 2

    def text_token_count(self, fold_text: bool | None = None) -> int:
        """Zero text tokens in the context: K, or 1 when folded."""
        fold = self.settings.fold_text_tokens if fold_text is None else fold_text
        return 1 if fold else self.settings.text_tokens

    def parameter_count(self) -> dict[str, int]:
        counts = {name: _count(getattr(self, name)) for name in COMPONENTS}
        counts["total"] = sum(counts.values())
        return counts

    # ---------------------------------------------------------------- VAE
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> normalized latents (z - shift) * scale, (B, 16, H/8, W/8).

        Uses the posterior mean (deterministic); FluxFillPipeline samples the posterior, whose std is negligible.
        """
        pixels = pixels.to(device=self.vae.device, dtype=self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.mode()
        return (latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalized latents (B, 16, h, w) -> pixels (B, 3, 8h, 8w), nominally in [-1, 1] (not clamped)."""
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(latents).sample

    def build_condition(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Diptych pixels (B, 3, S, 2S) + mask (B, [1,] S, 2S) -> Fill condition (B, N, 320).

        As FluxFillPipeline: masked = pixels * (1 - mask) is VAE-encoded, normalized and packed (64 channels),
        followed by the packed 8x8-block pixel mask (256 channels).
        """
        if mask.ndim == 3:
            mask = mask[:, None]
        if mask.shape[0] != pixels.shape[0] or mask.shape[-2:] != pixels.shape[-2:]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match pixels {tuple(pixels.shape)}")
        mask = (mask.to(device=pixels.device, dtype=torch.float32) > 0.5).to(pixels.dtype)
        latents = self.encode_images(pixels * (1 - mask))
        packed_mask = pack_mask(mask, self.vae_scale_factor).to(latents.dtype)
        condition = torch.cat([pack_latents(latents), packed_mask], dim=-1)
        assert condition.shape[-1] == CONDITION_CHANNELS and packed_mask.shape[-1] == MASK_CHANNELS
        return condition

    # ---------------------------------------------------------------- reference
    def reference_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Reference pixels (B, 3, H, W) in [-1, 1] -> SigLIP input: bicubic (antialiased) resize, normalisation."""
        size = self.reference_size
        pixels = pixels.float()
        if tuple(pixels.shape[-2:]) != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        pixels = pixels.clamp(-1.0, 1.0)  # bicubic overshoots; the PIL path clips to uint8
        return ((pixels + 1.0) / 2.0 - SIGLIP_MEAN) / SIGLIP_STD

    def encode_reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """Reference pixels (B, 3, S, S) in [-1, 1] -> Redux tokens (B, R, joint_dim)."""
        parameter = next(self.image_encoder.parameters())
        siglip_input = self.reference_pixels(pixels.to(parameter.device)).to(parameter.dtype)
        features = self.image_encoder(pixel_values=siglip_input).last_hidden_state
        return self.redux(features.to(next(self.redux.parameters()).dtype)).image_embeds

    def context(
        self,
        reference_tokens: torch.Tensor,
        fold_text: bool | None = None,
        text_states: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[text tokens ; Redux tokens] and their (all-zero) RoPE ids.

        Reference mode (``text_states`` None): K zero text tokens, or one when folded (its key bias must then carry
        log K; see runtime.attention_bias). UniDG-Text: ``text_states`` (B, L, joint_dim), T5's hidden states of the
        instruction (``unidg.train.text_encoders``), take the zeros' place; they differ from one another, so they
        are never folded (build their key bias with ``fold_text=False``).
        """
        batch, _, width = reference_tokens.shape
        if width != self.joint_dim:
            raise ValueError(f"reference tokens have width {width}; the transformer expects {self.joint_dim}")
        if text_states is None:
            text = reference_tokens.new_zeros(batch, self.text_token_count(fold_text), width)
        else:
            if fold_text:
                raise UniDGError(
                    "fold_text=True with text_states: folding is exact only for the zero text tokens of reference "
                    "mode; pass fold_text=False (or None) with an instruction's text states"
                )
            if text_states.ndim != 3 or text_states.shape[0] != batch or text_states.shape[2] != width:
                raise UniDGError(
                    f"text states of shape {tuple(text_states.shape)}: expected ({batch}, L, {width}), T5 hidden "
                    "states of the same batch in the transformer's joint_attention_dim"
                )
            text = text_states.to(device=reference_tokens.device, dtype=reference_tokens.dtype)
        context = torch.cat([text, reference_tokens], dim=1)
        txt_ids = torch.zeros(context.shape[1], 3, device=context.device, dtype=context.dtype)
        return context, txt_ids

    def key_bias(
        self, defect_tokens: torch.Tensor, fold_text: bool | None = None, alpha: float | None = None
    ) -> torch.Tensor:
        """Key bias (B, N_ctx + N_img) float32 for defect tokens (B, N_img) bool, on their device.

        The runtime's definition (unidg.core.attention_bias.build_key_bias) with this model's R, K and alpha.
        """
        fold = self.settings.fold_text_tokens if fold_text is None else fold_text
        bias = build_key_bias(
            defect_tokens.detach().cpu().bool().numpy(),
            self.reference_tokens,
            self.settings.text_tokens,
            self.settings.alpha if alpha is None else alpha,
            fold,
        )
        return torch.from_numpy(bias).to(defect_tokens.device)

    # ---------------------------------------------------------------- transformer
    def velocity(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        ctx: torch.Tensor,
        key_bias: torch.Tensor | None,
        sigma: torch.Tensor | float,
        guidance: torch.Tensor | float,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow velocity (B, N, 64), in the transformer's dtype, of packed latents x (B, N, 64) at noise level sigma.

        key_bias: (B, N_ctx + N_img) additive per-key attention bias (None: plain attention).
        pooled: (B, pooled_projection_dim) CLIP pooled output of an instruction (UniDG-Text); None: zeros, as
        reference mode has no prompt.
        """
        batch = x.shape[0]
        config = self.transformer.config
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(batch)
        guidance_input = None
        if config.guidance_embeds:
            guidance_input = torch.as_tensor(guidance, device=x.device, dtype=torch.float32).reshape(-1).expand(batch)
        if txt_ids is None:
            txt_ids = torch.zeros(ctx.shape[1], 3, device=x.device)
        dtype = self.dtype  # inputs may be float32 around a bf16/fp16 transformer; the output is in its dtype
        if pooled is None:
            pooled = torch.zeros(batch, config.pooled_projection_dim, device=x.device, dtype=dtype)  # no CLIP prompt
        elif tuple(pooled.shape) != (batch, config.pooled_projection_dim):
            raise UniDGError(
                f"pooled of shape {tuple(pooled.shape)}: expected ({batch}, {config.pooled_projection_dim}), the CLIP "
                "pooled output of the same batch"
            )
        attention_kwargs = None if key_bias is None else {"key_bias": key_bias}
        return self.transformer(
            hidden_states=torch.cat([x.to(dtype), cond.to(dtype)], dim=2),
            encoder_hidden_states=ctx.to(dtype),
            pooled_projections=pooled.to(device=x.device, dtype=dtype),
            timestep=sigma,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance_input,
            joint_attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]

    forward = velocity
