"""Exact per-key-bias attention with any fused SDPA kernel: fold the bias into one extra head dimension.

    softmax(scale * q.k + b[key]) == softmax(scale * q'.k')    with    q' = [q, 1, 0...], k' = [k, b / scale, 0...]

because q'.k' = q.k + b / scale. The extra column is zero-padded to a multiple of 8 (fused kernels want head sizes in
multiples of 8) and ``scale`` is passed to SDPA explicitly as the ORIGINAL 1/sqrt(D): SDPA's default would use the
padded width. By default V is zero-padded to the same width so backends that require equal Q/K/V head sizes (flash)
accept it; the padded output columns are exactly 0 and are sliced off. Cost for D = 128 (width 136): +6.25%
attention FLOPs with V padded, +3.1% with ``pad_value=False`` (only QK^T grows; for backends that accept a different
V head size).

Exactness:
- finite biases: exact in exact arithmetic; in float32 the result differs from the explicit reference only by
  rounding (one extra product in each dot; <= 1e-5 in the tests). In bf16/fp16 the bias column is rounded to the
  dtype like K itself (bf16: ~0.4% of b / scale).
- ``-inf`` (padded keys): a key column of -inf would give 0 * -inf = NaN in some kernels and overflows fp16 as
  b / scale, so masked keys get the finite bias ``MASKED_KEY_BIAS`` (-1000 in logits). exp(-1000 + m) underflows to
  exactly 0 in float32 whenever the largest unmasked logit m is above -900 (|scale * q.k + b| is O(10) here), so the
  masked keys' weights are exactly 0 as with -inf.
- a batch element whose keys are all masked: defined as output 0 (as the Triton kernel and the reference do); without
  the explicit zeroing the fold would average V over the masked keys.

Traceable: torch.export (and so the ONNX exporter's ``portable_mask="fold"``) traces these functions as they are. The
only check that reads tensor values (no NaN or +inf in the bias) runs in eager mode and is skipped while compiling or
exporting; the masked-key substitution and the zeroing of fully masked batch elements are ``torch.where`` on tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PAD_MULTIPLE = 8
MASKED_KEY_BIAS = -1000.0


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"query/key/value must be [B, H, S, D]; got {shapes}")
    if k.shape[:2] != q.shape[:2] or v.shape[:3] != k.shape[:3] or k.shape[3] != q.shape[3]:
        raise ValueError(f"key/value must match query [B, H, *, D]; got {tuple(k.shape)}, {tuple(v.shape)}")
    if key_bias.shape != (k.shape[0], k.shape[2]):
        raise ValueError(f"key_bias must be [batch, seq_k] = [{k.shape[0]}, {k.shape[2]}], got {tuple(key_bias.shape)}")


def folded_width(head_dim: int, multiple: int = PAD_MULTIPLE) -> int:
    """Head size after adding the bias column and zero-padding to ``multiple``."""
    return (head_dim + 1 + multiple - 1) // multiple * multiple


def fold_key_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    scale: float | None = None,
    multiple: int = PAD_MULTIPLE,
    pad_value: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """(q', k', v', scale) such that ``SDPA(q', k', v', scale=scale)[..., :D]`` is the biased attention.

    With ``pad_value=False`` v is returned unchanged (and the SDPA output needs no slicing).
    """
    _check(q, k, v, key_bias)
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    pad = folded_width(head_dim, multiple) - head_dim
    bias = key_bias.to(torch.float32)
    bias = torch.where(torch.isneginf(bias), torch.full_like(bias, MASKED_KEY_BIAS), bias)
    if not torch.compiler.is_compiling() and not torch.isfinite(bias).all():  # reads values: eager mode only
        raise ValueError("key_bias may contain finite values and -inf only (no NaN or +inf)")

    column = (bias / scale)[:, None, :, None].expand(*k.shape[:-1], 1).to(k.dtype)
    q_fold = torch.cat([q, torch.ones_like(q[..., :1]), q.new_zeros(*q.shape[:-1], pad - 1)], dim=-1)
    k_fold = torch.cat([k, column, k.new_zeros(*k.shape[:-1], pad - 1)], dim=-1)
    if not pad_value:
        return q_fold, k_fold, v, scale
    v_fold = torch.cat([v, v.new_zeros(*v.shape[:-1], pad)], dim=-1)
    return q_fold, k_fold, v_fold, scale


def folded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    scale: float | None = None,
    pad_value: bool = True,
) -> torch.Tensor:
    """softmax(scale * q k^T + key_bias) v via an unmasked SDPA call; same signature as the biased attention.

    q: [B, H, S_q, D]; k, v: [B, H, S_k, D]; key_bias: [B, S_k] (0, log-weights, -inf for padding).
    """
    head_dim = q.shape[-1]
    q_fold, k_fold, v_fold, scale = fold_key_bias(q, k, v, key_bias, scale, pad_value=pad_value)
    out = F.scaled_dot_product_attention(q_fold, k_fold, v_fold, scale=scale)[..., :head_dim]
    # Zero the batch elements whose keys are all masked: a per-row flag, no host sync (CUDA graphs, torch.export).
    any_key = (~torch.isneginf(key_bias)).any(dim=-1)[:, None, None, None]
    return torch.where(any_key, out, torch.zeros_like(out))
