"""Biased attention, exactly, as unbiased fused attention over groups of keys.

UniDG's per-key bias takes a handful of values per sample (``build_key_bias``: log K on the folded text key, 0 on
reference and plain image keys, log alpha on defect keys, -inf on padding). Attention is a sum over keys, so with the
keys split into groups G of one bias value b_G each,

    out = sum_G exp(lse_G + b_G - L) * out_G,    L = log sum_G exp(lse_G + b_G),

where out_G and lse_G are the unbiased attention over the keys of G and its log-sum-exp of the scaled scores. Each
out_G runs on the fastest unbiased kernel the device has (cuDNN or flash attention on CUDA, flash attention on the
CPU): the bias costs a gather of K and V by group and one weighted sum instead of a float mask inside the kernel.
Keys at -inf are left out; a query row with no finite key gets zeros (the Triton kernel's definition).

The groups follow the data (the defect mask), so their sizes change per request and finding them synchronises with
the host: this form suits eager execution, not a captured CUDA graph. ``unidg bench attention`` times it against the
other forms.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MAX_KEY_GROUPS = 8  # distinct finite bias values per sample; UniDG's bias has at most three


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Unbiased attention and the float32 log-sum-exp [B, H, S_q] of its scaled scores (natural log)."""
    import torch

    if q.device.type == "cuda":
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]
        except RuntimeError:  # no cuDNN attention for this dtype, shape or GPU
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    return out, lse.reshape(q.shape[:3]).float()


def key_group_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + key_bias[:, None, None, :]) v for q [B, H, S_q, D], k and v [B, H, S_k, D] and
    key_bias [B, S_k]; output in q's dtype. Raises ValueError for other shapes or more than ``MAX_KEY_GROUPS``
    distinct finite bias values in one sample."""
    import torch

    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(
            f"query must be [B, H, S_q, D] and key/value [B, H, S_k, D] alike; got query {tuple(q.shape)}, "
            f"key {tuple(k.shape)}, value {tuple(v.shape)}"
        )
    if key_bias.shape != (q.shape[0], k.shape[2]):
        raise ValueError(f"key_bias must be [batch, S_k] = [{q.shape[0]}, {k.shape[2]}], got {tuple(key_bias.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        bias = key_bias[b].float()
        values = torch.unique(bias[torch.isfinite(bias)]).tolist()
        if len(values) > MAX_KEY_GROUPS:
            raise ValueError(
                f"key_bias of sample {b} has {len(values)} distinct finite values, more than {MAX_KEY_GROUPS}: "
                "this form is for biases of a few levels (build_key_bias); use the float-mask or Triton form"
            )
        parts = []
        for value in values:
            keys = torch.nonzero(bias == value).squeeze(1)
            group_out, lse = attention_with_lse(
                q[b : b + 1], k[b : b + 1].index_select(2, keys), v[b : b + 1].index_select(2, keys), scale
            )
            parts.append((group_out, lse + value))
        if len(parts) == 1:
            out[b] = parts[0][0][0]
        elif parts:
            total = torch.logsumexp(torch.stack([lse for _, lse in parts]), dim=0)
            merged = sum(group_out.float() * torch.exp(lse - total)[..., None] for group_out, lse in parts)
            out[b] = merged[0].to(q.dtype)
    return out
