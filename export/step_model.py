"""The torch modules that export lowers to the four graphs of a bundle (Bundle format v1).

``StepModel`` is one denoising step: the transformer's velocity plus the Euler update, so the 28-step loop is 28
identical launches with no host math in between. Everything the transformer needs besides the bundle inputs lives in
the graph: the pooled projection (zeros in reference mode; a UniDG-Text step's input ``pooled``), the RoPE tables
(computed from ``img_ids``/``txt_ids`` in float32) and the casts to the internal precision. All graph inputs and
outputs are float32.

The other three wrap the VAE encoder (normalized posterior mean), the VAE decoder and SigLIP + Redux.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch import nn

from unidg.export.lowered_flux import LoweredFlux
from unidg.train.model import UniDGModel
from unidg.train.split_transformer import rotary_embedding, run_tail_blocks, transformer_head, velocity_out


class Float32RopeEmbed(nn.Module):
    """FLUX's RoPE table (cos, sin) from position ids, computed in float32.

    diffusers' ``FluxPosEmbed`` computes the frequencies in float64 on CPU/CUDA; float64 has no place in a
    TensorRT engine, and the positions (< 2S/16 = 96 at S = 768) keep the float32 angle error near 1e-5 rad.
    """

    def __init__(self, theta: int, axes_dim: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = ids.float()
        cos_parts, sin_parts = [], []
        for axis, dim in enumerate(self.axes_dim):
            cos, sin = get_1d_rotary_pos_embed(
                dim, positions[:, axis], theta=self.theta, repeat_interleave_real=True, use_real=True,
                freqs_dtype=torch.float32,
            )  # fmt: skip
            cos_parts.append(cos)
            sin_parts.append(sin)
        return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


@contextlib.contextmanager
def float32_rope(model: UniDGModel) -> Iterator[None]:
    """Temporarily compute the transformer's RoPE in float32 (for export); restores diffusers' module after."""
    transformer = model.transformer
    original = transformer.pos_embed
    transformer.pos_embed = Float32RopeEmbed(original.theta, original.axes_dim)
    try:
        yield
    finally:
        transformer.pos_embed = original


def _euler(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    return x + (sigma_next - sigma).float()[:, None, None] * velocity.float()


class ModelGraph(nn.Module):
    """One graph of a bundle, computed from a ``UniDGModel`` (registered as ``model``, so every graph's weights are
    named ``model.*``); subclasses say what ``forward`` computes.

    ``lowered``: the step graphs' transformer as ``unidg.export.lowered_flux.LoweredFlux`` computes it (every exported
    step graph and program); None runs the model's own diffusers forward (the reference the tests compare with)."""

    def __init__(self, model: UniDGModel, lowered: LoweredFlux | None = None) -> None:
        super().__init__()
        self.model = model
        self.lowered = lowered


class StepModel(ModelGraph):
    """x_next = x + (sigma_next - sigma) * v(x, cond, ctx, key_bias, sigma, guidance, img_ids, txt_ids[, pooled]).

    Inputs are float32 whatever the model's dtype; the transformer runs in its own dtype and the update in float32.
    ``pooled`` (a UniDG-Text bundle's tenth input): the instruction's CLIP pooled output; absent, zeros as in
    reference mode.
    """

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        ctx: torch.Tensor,
        key_bias: torch.Tensor,
        sigma: torch.Tensor,
        sigma_next: torch.Tensor,
        guidance: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = self.model.dtype
        velocity = self.model.velocity if self.lowered is None else self.lowered
        v = velocity(
            x.to(dtype), cond.to(dtype), ctx.to(dtype), key_bias.float(), sigma, guidance, img_ids, txt_ids,
            pooled=None if pooled is None else pooled.to(dtype),
        )  # fmt: skip
        return _euler(x, sigma, sigma_next, v)


class StepHeadModel(ModelGraph):
    """Step caching, every step: embedders + first block -> (hidden, encoder_hidden, temb, first_residual), float32.
    ``pooled``: a UniDG-Text bundle's head input (the instruction's CLIP pooled output); zeros without it.

    The split of ``StepModel`` that ``unidg.runtime.step_cache`` runs: head + tail equals the step, head + cached
    step reuses the tail residual of the last full step.
    """

    def forward(
        self, x, cond, ctx, key_bias, sigma, guidance, img_ids, txt_ids, pooled=None
    ) -> tuple[torch.Tensor, ...]:
        if pooled is not None:
            pooled = pooled.to(self.model.dtype)
        if self.lowered is not None:
            return self._lowered(x, cond, ctx, key_bias, sigma, guidance, img_ids, txt_ids, pooled)
        head = transformer_head(
            self.model, x, cond, ctx, key_bias.float(), sigma, guidance, img_ids, txt_ids, pooled=pooled
        )
        return head.hidden.float(), head.encoder_hidden.float(), head.temb.float(), head.first_residual.float()

    def _lowered(self, x, cond, ctx, key_bias, sigma, guidance, img_ids, txt_ids, pooled) -> tuple[torch.Tensor, ...]:
        lowered = self.lowered
        embedded, context, temb = lowered.embed(x, cond, ctx, sigma, guidance, pooled)
        conditioning = lowered.conditioning(temb, key_bias.float(), img_ids, txt_ids)
        hidden, context = lowered.run_blocks(embedded, context, conditioning)
        batch = conditioning.batch
        return (
            lowered.unsplit(hidden, batch).float(),
            lowered.unsplit(context, batch).float(),
            temb.float(),
            lowered.unsplit(hidden - embedded, batch).float(),
        )


class StepTailModel(ModelGraph):
    """Step caching, a full step: the other blocks + output stage + Euler -> (x_next, tail_residual), float32."""

    def forward(
        self, hidden, encoder_hidden, temb, key_bias, img_ids, txt_ids, x, sigma, sigma_next
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.model.dtype
        hidden = hidden.to(dtype)
        if self.lowered is not None:
            lowered = self.lowered
            conditioning = lowered.conditioning(temb.to(dtype), key_bias.float(), img_ids, txt_ids)
            batch = conditioning.batch
            tokens = (lowered.tokens(t, batch) for t in (hidden, encoder_hidden.to(dtype)))
            final, _ = lowered.run_blocks(*tokens, conditioning)
            velocity = lowered.velocity_out(final, conditioning)
            return _euler(x, sigma, sigma_next, velocity), (lowered.unsplit(final, batch) - hidden).float()
        rotary = rotary_embedding(self.model, img_ids, txt_ids)
        final = run_tail_blocks(self.model, hidden, encoder_hidden.to(dtype), temb.to(dtype), rotary, key_bias.float())
        velocity = velocity_out(self.model, final, temb.to(dtype))
        return _euler(x, sigma, sigma_next, velocity), (final - hidden).float()


class StepCachedModel(ModelGraph):
    """Step caching, a cached step: output stage on head output + kept tail residual, Euler -> x_next, float32."""

    def forward(self, hidden, tail_residual, temb, x, sigma, sigma_next) -> torch.Tensor:
        dtype = self.model.dtype
        velocity = velocity_out(self.model, (hidden + tail_residual).to(dtype), temb.to(dtype))
        return _euler(x, sigma, sigma_next, velocity)


class VaeEncoderModel(ModelGraph):
    """pixels [B, 3, S, 2S] in [-1, 1] -> normalized latents [B, 16, S/8, 2S/8] (posterior mean)."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_images(pixels.to(self.model.vae.dtype)).float()


class VaeDecoderModel(ModelGraph):
    """normalized latents [B, 16, h, w] -> pixels [B, 3, 8h, 8w] in [-1, 1] (not clamped)."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode_latents(latents.to(self.model.vae.dtype)).float()


class ImageEncoderModel(ModelGraph):
    """pixels [B, 3, P, P] in [-1, 1] (already resized to P by the caller) -> Redux tokens [B, R, J]."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_reference(pixels).float()
