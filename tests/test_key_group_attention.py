"""Biased attention as unbiased attention over key groups (export/key_group_attention.py) against the explicit
float32 definition, on the CPU (flash attention for CPU supplies the log-sum-exp)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unidg.core.attention_bias import build_key_bias, pad_key_bias
from unidg.export.key_group_attention import (
    MAX_KEY_GROUPS,
    attention_with_lse,
    contiguous_key_order,
    key_group_attention,
    key_range_attention,
    key_range_bounds,
)


def explicit_biased_attention(q, k, v, key_bias, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale + key_bias.double()[:, None, None, :]
    finite = torch.isfinite(scores).any(-1, keepdim=True)
    weights = torch.where(finite, torch.softmax(scores, -1), torch.zeros_like(scores))
    return weights.nan_to_num(0.0) @ v.double()


def unidg_bias(batch: int, image_tokens: int, seed: int, padding: int = 0) -> torch.Tensor:
    """build_key_bias of random defect masks (reference 6 tokens, K = 4 folded, alpha = 2), -inf padding keys."""
    rng = np.random.default_rng(seed)
    biases = [build_key_bias(rng.random(image_tokens) < 0.3, 6, 4, 2.0, fold_text=True) for _ in range(batch)]
    return torch.from_numpy(np.stack([pad_key_bias(b, b.shape[-1] + padding) for b in biases]))


def test_lse_of_the_cpu_kernel_is_the_natural_log_sum_exp_of_the_scaled_scores():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=gen) for _ in range(3))
    out, lse = attention_with_lse(q, k, v, scale=0.3)
    scores = (q @ k.transpose(-1, -2)) * 0.3
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), rtol=0, atol=1e-5)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding", [0, 5])
def test_key_groups_equal_the_biased_softmax_in_float32(padding):
    gen = torch.Generator().manual_seed(1)
    bias = unidg_bias(batch=2, image_tokens=40, seed=1, padding=padding)  # 1 text + 6 reference + 40 image (+ pad)
    keys = bias.shape[1]
    q = torch.randn(2, 3, 40, 32, generator=gen)
    k, v = (torch.randn(2, 3, keys, 32, generator=gen) for _ in range(2))
    got = key_group_attention(q, k, v, bias)
    assert got.dtype == torch.float32 and got.shape == q.shape
    assert len(torch.unique(bias[0][torch.isfinite(bias[0])])) == 3  # log K, 0, log alpha: three groups
    torch.testing.assert_close(got.double(), explicit_biased_attention(q, k, v, bias), rtol=0, atol=2e-6)


def test_key_groups_in_bfloat16_stay_within_bf16_rounding():
    gen = torch.Generator().manual_seed(2)
    bias = unidg_bias(batch=1, image_tokens=64, seed=2)
    q = torch.randn(1, 2, 64, 32, generator=gen).bfloat16()
    k, v = (torch.randn(1, 2, bias.shape[1], 32, generator=gen).bfloat16() for _ in range(2))
    got = key_group_attention(q, k, v, bias)
    want = explicit_biased_attention(q.float(), k.float(), v.float(), bias)
    assert got.dtype == torch.bfloat16
    assert (got.double() - want).abs().max() / want.abs().max() < 2e-2


def test_one_group_no_finite_key_and_too_many_levels():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 8, 16, generator=gen) for _ in range(3))
    flat = torch.full((2, 8), 0.7)  # one level: the bias cancels
    torch.testing.assert_close(key_group_attention(q, k, v, flat), torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)
    empty = torch.zeros(2, 8)
    empty[1] = -torch.inf  # sample 1 has no key to attend to: zeros, as the Triton kernel defines it
    got = key_group_attention(q, k, v, empty)
    assert torch.count_nonzero(got[1]) == 0 and torch.isfinite(got).all()
    keys = MAX_KEY_GROUPS + 2
    k, v = (torch.randn(2, 2, keys, 16, generator=gen) for _ in range(2))
    levels = torch.arange(2 * keys, dtype=torch.float32).reshape(2, keys)
    with pytest.raises(ValueError, match=f"more than {MAX_KEY_GROUPS}"):
        key_group_attention(q, k, v, levels)
    with pytest.raises(ValueError, match="key_bias must be"):
        key_group_attention(q, k, v, torch.zeros(2, 7))


def permuted_to_ranges(bias: torch.Tensor, context: int) -> torch.Tensor:
    """Key order [context | image tokens by bias level] (what contiguous_key_order does once per request)."""
    order = [*range(context), *(context + i for i in contiguous_key_order(bias[0, context:].numpy()))]
    return torch.tensor(order)


def test_key_ranges_equal_the_biased_softmax_and_need_no_gather():
    gen = torch.Generator().manual_seed(3)
    bias = unidg_bias(batch=1, image_tokens=40, seed=3)  # 1 text + 6 reference + 40 image
    order = permuted_to_ranges(bias, 7)
    ranged = bias[:, order]
    bounds = key_range_bounds(ranged)
    assert bounds.dtype == torch.int32 and bounds.tolist()[0][:2] == [0, 1] and bounds.tolist()[0][-1] == 47
    q = torch.randn(1, 3, 47, 32, generator=gen)
    k, v = (torch.randn(1, 3, 47, 32, generator=gen) for _ in range(2))
    got = key_range_attention(q, k[:, :, order], v[:, :, order], ranged, bounds)
    torch.testing.assert_close(got.double(), explicit_biased_attention(q, k, v, bias), rtol=0, atol=2e-6)


def test_key_ranges_with_padding_need_a_fourth_range_and_refuse_unsorted_biases():
    bias = unidg_bias(batch=1, image_tokens=30, seed=4, padding=5)  # ... | -inf x 5
    ranged = bias[:, torch.cat([permuted_to_ranges(bias[:, :37], 7), torch.arange(37, 42)])]
    with pytest.raises(ValueError, match="more than 3"):
        key_range_bounds(ranged)
    bounds = key_range_bounds(ranged, ranges=4)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 42, 16, generator=gen) for _ in range(3))
    got = key_range_attention(q, k, v, ranged, bounds)
    torch.testing.assert_close(got.double(), explicit_biased_attention(q, k, v, ranged), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="contiguous_key_order"):
        key_range_bounds(unidg_bias(batch=1, image_tokens=30, seed=5))  # defect keys scattered: many runs
