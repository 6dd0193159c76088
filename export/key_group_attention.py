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
the host: ``key_group_attention`` suits eager execution, not a captured CUDA graph. ``key_range_attention`` is the
capturable form: the image tokens are permuted once per request (``contiguous_key_order``) so that each bias level is
one contiguous key range, whose boundaries live on the device (``key_range_bounds``) and feed one variable-length
flash-attention call of fixed shape. ``unidg bench attention`` times both against the other forms.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_KEY_GROUPS = 8  # distinct finite bias values per sample; UniDG's bias has at most three


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Unbiased attention and the float32 log-sum-exp [B, H, S_q] of its scaled scores (natural log)."""
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


# --------------------------------------------------------------------------------- capturable: contiguous key ranges
KEY_RANGES = 3  # log K (folded text key), 0 (reference and plain image keys), log alpha (defect keys)


def contiguous_key_order(image_bias) -> list[int]:
    """A permutation of one sample's image tokens that makes each bias level a contiguous key range.

    ``image_bias`` ([N_img], the image part of the key bias): plain tokens first, then each higher level, each in
    its original order (stable). The transformer is equivariant to a token permutation that moves the RoPE ids with
    the tokens, so permuting x, cond and img_ids once per request (and the velocity back at the end) leaves the
    result unchanged while the key bias becomes [log K | 0 ... 0 | log alpha ...]: ranges that ``key_range_bounds``
    describes with a fixed number of device-side boundaries.
    """
    values = np.asarray(image_bias, dtype=np.float64).reshape(-1)
    return np.argsort(values, kind="stable").tolist()


def key_range_bounds(key_bias, ranges: int = KEY_RANGES):
    """Boundaries [B, ranges + 1] (int32, on key_bias's device) of the runs of equal bias in a key bias whose levels
    are contiguous (``contiguous_key_order``): range g of sample b is keys [bounds[b, g], bounds[b, g + 1]).

    Found once per request on the host; unused ranges are empty at the end, so the attention call has fixed shapes
    whatever the defect size. Raises ValueError when a sample has more than ``ranges`` runs.
    """
    rows = key_bias.detach().float().cpu()
    bounds = torch.empty(rows.shape[0], ranges + 1, dtype=torch.int32)
    for b, row in enumerate(rows):
        change = (row[1:] != row[:-1]).nonzero().squeeze(1) + 1
        starts = [0, *change.tolist()]
        if len(starts) > ranges:
            raise ValueError(
                f"key_bias of sample {b} has {len(starts)} runs of equal values, more than {ranges}: permute the image "
                "tokens with contiguous_key_order first (or use key_group_attention, which gathers the groups)"
            )
        starts += [row.shape[0]] * (ranges + 1 - len(starts))
        bounds[b] = torch.tensor(starts, dtype=torch.int32)
    return bounds.to(key_bias.device)


def _range_attention_cuda(q, k, v, bounds, scale: float):
    """Every (sample, range) pair as one sequence of a variable-length flash-attention call: the queries repeated
    per range, the keys in place (ranges are contiguous), boundaries read on the device: capturable."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    batch, heads, queries, dim = q.shape
    ranges = bounds.shape[1] - 1
    keys = k.shape[2]
    offsets = torch.arange(batch, device=q.device, dtype=torch.int32)[:, None] * keys
    cu_k = torch.cat([(bounds[:, :ranges] + offsets).reshape(-1), bounds.new_full((1,), batch * keys)])
    cu_q = torch.arange(batch * ranges + 1, device=q.device, dtype=torch.int32) * queries
    packed_q = q.transpose(1, 2)[:, None].expand(batch, ranges, queries, heads, dim).reshape(-1, heads, dim)
    packed_k = k.transpose(1, 2).reshape(-1, heads, dim)
    packed_v = v.transpose(1, 2).reshape(-1, heads, dim)
    # the default scale is left implicit: not every torch release's varlen_attn takes a ``scale`` argument
    extra = {} if math.isclose(scale, 1.0 / math.sqrt(dim)) else {"scale": scale}
    out, lse = varlen_attn(
        packed_q, packed_k, packed_v, cu_q, cu_k, queries, keys, return_aux=AuxRequest(lse=True), **extra
    )
    out = out.reshape(batch, ranges, queries, heads, dim).permute(0, 1, 3, 2, 4)
    if lse.shape[0] == heads:  # flash-attention's varlen layout: [H, total_q]
        lse = lse.reshape(heads, batch, ranges, queries).permute(1, 2, 0, 3)
    else:  # [total_q, H]
        lse = lse.reshape(batch, ranges, queries, heads).permute(0, 1, 3, 2)
    return out, lse.float()


def _range_attention_reference(q, k, v, bounds, scale: float):
    """The same per-range outputs and log-sum-exps with host-side boundaries (CPU; not capturable)."""
    batch, heads, queries, dim = q.shape
    ranges = bounds.shape[1] - 1
    out = q.new_zeros(batch, ranges, heads, queries, dim)
    lse = torch.full((batch, ranges, heads, queries), -math.inf, device=q.device)
    for b, row in enumerate(bounds.tolist()):
        for g in range(ranges):
            start, end = row[g], row[g + 1]
            if end > start:
                group_out, group_lse = attention_with_lse(
                    q[b : b + 1], k[b : b + 1, :, start:end], v[b : b + 1, :, start:end], scale
                )
                out[b, g], lse[b, g] = group_out[0], group_lse[0]
    return out, lse


def key_range_attention(q, k, v, key_bias, bounds, scale: float | None = None):
    """``softmax(scale * q k^T + key_bias) v`` for a key bias that is constant on each range of ``bounds``
    (``key_range_bounds``): unbiased attention per range merged by log-sum-exp, as ``key_group_attention``, but with
    no gather and no host synchronisation on CUDA (one variable-length flash-attention call with device-side
    boundaries), so a CUDA graph can capture it. q [B, H, S_q, D], k and v [B, H, S_k, D], key_bias [B, S_k].
    Empty ranges and -inf ranges contribute nothing; a query row with no finite key gets zeros."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or key_bias.shape != (q.shape[0], k.shape[2]):
        raise ValueError(
            f"key_range_attention needs q [B, H, S_q, D], k/v [B, H, S_k, D] and key_bias [B, S_k]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, key_bias {tuple(key_bias.shape)}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bounds = bounds.to(device=q.device, dtype=torch.int32)
    if q.device.type == "cuda":
        out, lse = _range_attention_cuda(q, k, v, bounds, scale)
    else:
        out, lse = _range_attention_reference(q, k, v, bounds, scale)
    starts = bounds[:, :-1].long().clamp(max=k.shape[2] - 1)
    levels = key_bias.float().gather(1, starts)  # [B, ranges]
    present = bounds[:, 1:] > bounds[:, :-1]
    shifted = torch.where(present[:, :, None, None], lse + levels[:, :, None, None], -math.inf)
    total = torch.logsumexp(shifted, dim=1, keepdim=True)
    weights = torch.exp(shifted - total).nan_to_num(0.0)  # all -inf rows: zeros
    return (out.float().nan_to_num(0.0) * weights[..., None]).sum(dim=1).to(q.dtype)
