"""The one attention mechanism of UniDG: FLUX attention with an additive per-key bias.

``softmax(Q Kᵀ / √d + b[key]) V`` over the joint sequence ``[context; image]``, the same bias for every query and
head. It carries the paper's defect attention (log α on reference-defect and target-region image keys), exact
text-token folding (log K on the single kept zero text key) and padding (−inf). Projections, QK RMS-norms, RoPE and
token order are those of diffusers' ``FluxAttnProcessor``; with no bias this processor computes exactly what it does.

The bias reaches every double and single block through the transformer's ``joint_attention_kwargs``:
``transformer(..., joint_attention_kwargs={"key_bias": b})`` with ``b`` of shape (B, N_ctx + N_img).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxTransformer2DModel

from unidg.train.headdim_fold import folded_attention

KEY_BIAS = "key_bias"
BACKENDS = ("sdpa", "headdim_fold")


def _heads(tensor: torch.Tensor, head_dim: int) -> torch.Tensor:
    return tensor.unflatten(-1, (-1, head_dim))


def _projections(attn: FluxAttention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """Q, K, V of the joint sequence as (B, N, H, D), context first: the order FluxAttnProcessor uses."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = attn.norm_q(_heads(query, attn.head_dim))
    key = attn.norm_k(_heads(key, attn.head_dim))
    value = _heads(value, attn.head_dim)

    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if getattr(attn, "fused_projections", False):
            context_q, context_k, context_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            context_q = attn.add_q_proj(encoder_hidden_states)
            context_k = attn.add_k_proj(encoder_hidden_states)
            context_v = attn.add_v_proj(encoder_hidden_states)
        context_q = attn.norm_added_q(_heads(context_q, attn.head_dim))
        context_k = attn.norm_added_k(_heads(context_k, attn.head_dim))
        context_v = _heads(context_v, attn.head_dim)
        query = torch.cat([context_q, query], dim=1)
        key = torch.cat([context_k, key], dim=1)
        value = torch.cat([context_v, value], dim=1)
    return query, key, value


def _key_bias_mask(key_bias: torch.Tensor, batch: int, num_keys: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) or (N,) per-key bias -> (B, 1, 1, N) additive mask that SDPA broadcasts over heads and queries."""
    if key_bias.ndim == 1:
        key_bias = key_bias[None]
    # batch before 1: with a symbolic batch (torch.export) ``shape[0] != batch`` is decided without a guard
    if key_bias.ndim != 2 or key_bias.shape[-1] != num_keys or (key_bias.shape[0] != batch and key_bias.shape[0] != 1):
        raise ValueError(
            f"key_bias must have shape ({batch}, {num_keys}) = (batch, context + image tokens), got "
            f"{tuple(key_bias.shape)}; build it with unidg.core.attention_bias.build_key_bias"
        )
    return key_bias.to(dtype)[:, None, None, :]


class KeyBiasAttnProcessor:
    """FluxAttnProcessor plus an additive per-key bias (``key_bias``), for double and single blocks alike.

    ``backend="sdpa"`` hands the bias to torch's scaled_dot_product_attention as a broadcast float mask.
    ``backend="headdim_fold"`` calls ``unidg.train.headdim_fold.folded_attention(query, key, value, key_bias)``
    (layout (B, H, N, D), bias (B, N)), which folds the bias into an extra head dimension so that mask-less fused
    kernels compute the same thing. Both backends trace with torch.export; the exporter's ``portable_mask="fold"``
    is this processor with ``backend="headdim_fold"``.
    """

    def __init__(self, backend: str = "sdpa") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.backend = backend

    def attention(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """softmax(Q Kᵀ/√d + b[key]) V on (B, H, N, D) tensors."""
        if self.backend == "headdim_fold" and key_bias is not None:
            # float32 bias: the fold rounds b / scale to the K dtype itself
            bias = _key_bias_mask(key_bias, query.shape[0], key.shape[2], torch.float32)[:, 0, 0, :]
            return folded_attention(query, key, value, bias.expand(query.shape[0], -1))
        mask = None if key_bias is None else _key_bias_mask(key_bias, query.shape[0], key.shape[2], query.dtype)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask)

    def __call__(
        self,
        attn: FluxAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("pass the attention bias as joint_attention_kwargs={'key_bias': b}, not attention_mask")
        query, key, value = _projections(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        out = self.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key_bias)
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        context_len = encoder_hidden_states.shape[1]
        encoder_hidden_states, hidden_states = hidden_states[:, :context_len], hidden_states[:, context_len:]
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def flux_attention_modules(transformer: FluxTransformer2DModel) -> list[FluxAttention]:
    """The attention of every double block, then every single block."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    return [block.attn for block in blocks]


def install_key_bias_processor(transformer: FluxTransformer2DModel, backend: str = "sdpa") -> KeyBiasAttnProcessor:
    """Install one shared KeyBiasAttnProcessor on every double and single block; returns it."""
    processor = KeyBiasAttnProcessor(backend)
    for attn in flux_attention_modules(transformer):
        attn.set_processor(processor)
    return processor


def set_attention_backend(transformer: FluxTransformer2DModel, backend: str) -> None:
    """Switch the installed KeyBiasAttnProcessor(s) between ``"sdpa"`` and ``"headdim_fold"``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    for attn in flux_attention_modules(transformer):
        if not isinstance(attn.processor, KeyBiasAttnProcessor):
            raise ValueError("the transformer has no key-bias processor; call install_key_bias_processor first")
        attn.processor.backend = backend
