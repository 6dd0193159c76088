"""The FLUX transformer cut after its first block, for step caching (unidg.runtime.step_cache).

``transformer_head`` runs the embedders and the first double block; ``transformer_tail`` the remaining blocks;
``velocity_out`` the output norm and projection. Head + tail + out is diffusers' ``FluxTransformer2DModel.forward``
step for step (same modules, same order), so it equals ``UniDGModel.velocity``; a cached step replaces the tail by
the image-stream residual the tail added at the last fully computed step (First-Block Cache):

    head = transformer_head(model, x, cond, ctx, key_bias, sigma, guidance, img_ids, txt_ids)
    final = transformer_tail(model, head, key_bias)          # a full step; keep tail_residual = final - head.hidden
    final = head.hidden + tail_residual                      # a cached step
    v = velocity_out(model, final, head.temb)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unidg.train.model import UniDGModel


@dataclass
class TransformerHead:
    """The transformer's state after its first block, plus what the rest of the forward needs."""

    hidden: torch.Tensor  # (B, N, D) image stream after the first block
    encoder_hidden: torch.Tensor  # (B, C, D) context stream after the first block
    temb: torch.Tensor  # (B, D) time + guidance embedding
    rotary: tuple[torch.Tensor, torch.Tensor]  # RoPE (cos, sin) over [context; image]
    first_residual: torch.Tensor  # (B, N, D) what the first block added to the image stream: the cache signal


def _attention_kwargs(key_bias: torch.Tensor | None) -> dict | None:
    return None if key_bias is None else {"key_bias": key_bias}


def transformer_head(
    model: UniDGModel,
    x: torch.Tensor,
    cond: torch.Tensor,
    ctx: torch.Tensor,
    key_bias: torch.Tensor | None,
    sigma: torch.Tensor | float,
    guidance: torch.Tensor | float,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    pooled: torch.Tensor | None = None,
) -> TransformerHead:
    """Embedders + first double block, with ``UniDGModel.velocity``'s input conventions (``pooled``: a UniDG-Text
    instruction's CLIP pooled output; zeros without one)."""
    transformer = model.transformer
    config = transformer.config
    batch = x.shape[0]
    dtype = model.dtype
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1).expand(batch)
    if pooled is None:
        pooled = torch.zeros(batch, config.pooled_projection_dim, device=x.device, dtype=dtype)
    embedded = transformer.x_embedder(torch.cat([x.to(dtype), cond.to(dtype)], dim=2))
    timestep = sigma.to(embedded.dtype) * 1000
    if config.guidance_embeds:
        guidance = torch.as_tensor(guidance, device=x.device, dtype=torch.float32).reshape(-1).expand(batch)
        temb = transformer.time_text_embed(timestep, guidance.to(embedded.dtype) * 1000, pooled)
    else:
        temb = transformer.time_text_embed(timestep, pooled)
    encoder_hidden = transformer.context_embedder(ctx.to(dtype))
    rotary = rotary_embedding(model, img_ids, txt_ids)
    encoder_hidden, hidden = transformer.transformer_blocks[0](
        hidden_states=embedded,
        encoder_hidden_states=encoder_hidden,
        temb=temb,
        image_rotary_emb=rotary,
        joint_attention_kwargs=_attention_kwargs(key_bias),
    )
    return TransformerHead(hidden, encoder_hidden, temb, rotary, hidden - embedded)


def rotary_embedding(model: UniDGModel, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """RoPE (cos, sin) over [context; image], as the transformer's forward computes it."""
    return model.transformer.pos_embed(torch.cat((txt_ids, img_ids), dim=0))


def transformer_tail(model: UniDGModel, head: TransformerHead, key_bias: torch.Tensor | None) -> torch.Tensor:
    """The image stream after every block but the first: (B, N, D)."""
    return run_tail_blocks(model, head.hidden, head.encoder_hidden, head.temb, head.rotary, key_bias)


def run_tail_blocks(
    model: UniDGModel,
    hidden: torch.Tensor,
    encoder_hidden: torch.Tensor,
    temb: torch.Tensor,
    rotary: tuple[torch.Tensor, ...],
    key_bias: torch.Tensor | None,
) -> torch.Tensor:
    """Every block but the first, from the two streams after the first: the final image stream (B, N, D)."""
    transformer = model.transformer
    blocks = [*list(transformer.transformer_blocks)[1:], *transformer.single_transformer_blocks]
    for block in blocks:
        encoder_hidden, hidden = block(
            hidden_states=hidden,
            encoder_hidden_states=encoder_hidden,
            temb=temb,
            image_rotary_emb=rotary,
            joint_attention_kwargs=_attention_kwargs(key_bias),
        )
    return hidden


def velocity_out(model: UniDGModel, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """The output AdaLN and projection: final image stream (B, N, D) -> velocity (B, N, 64) in the model's dtype."""
    transformer = model.transformer
    return transformer.proj_out(transformer.norm_out(hidden, temb))
