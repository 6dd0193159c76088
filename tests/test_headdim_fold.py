"""Head-dimension fold of the per-key bias: exact against the explicit biased attention."""

from __future__ import annotations

import math

import pytest
import torch

from unidg.export.plugins.attention_kernel import reference_biased_attention
from unidg.train.headdim_fold import MASKED_KEY_BIAS, fold_key_bias, folded_attention, folded_width


def _inputs(batch=2, heads=3, seq_q=21, seq_k=33, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_q, head_dim, generator=gen)
    k = torch.randn(batch, heads, seq_k, head_dim, generator=gen)
    v = torch.randn(batch, heads, seq_k, head_dim, generator=gen)
    bias = torch.randn(batch, seq_k, generator=gen) * 2.0
    return q, k, v, bias


@pytest.mark.parametrize("pad_value", [True, False])
@pytest.mark.parametrize("head_dim", [16, 24, 128])
def test_fold_matches_biased_reference_fp32(head_dim: int, pad_value: bool) -> None:
    q, k, v, bias = _inputs(head_dim=head_dim)
    out = folded_attention(q, k, v, bias) if pad_value else folded_attention(q, k, v, bias, pad_value=False)
    assert out.shape == q.shape
    assert (out - reference_biased_attention(q, k, v, bias)).abs().max().item() <= 1e-5


def test_fold_with_padding_keys_and_explicit_scale() -> None:
    q, k, v, bias = _inputs(seq_k=40)
    bias[0, :7] = -math.inf
    bias[1, 30:] = -math.inf
    bias[:, 10] += math.log(512)  # a folded text key
    out = folded_attention(q, k, v, bias, scale=0.21)
    ref = reference_biased_attention(q, k, v, bias, scale=0.21)
    assert (out - ref).abs().max().item() <= 1e-5


def test_fully_masked_batch_is_zero_not_nan() -> None:
    q, k, v, bias = _inputs()
    bias[1] = -math.inf
    out = folded_attention(q, k, v, bias)
    assert not torch.isnan(out).any()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert (out[0] - reference_biased_attention(q, k, v, bias)[0]).abs().max().item() <= 1e-5


def test_folded_tensors_layout() -> None:
    q, k, v, bias = _inputs(head_dim=16)
    bias[0, 3] = -math.inf
    qf, kf, vf, scale = fold_key_bias(q, k, v, bias)
    assert folded_width(16) == 24 and folded_width(128) == 136 and folded_width(7) == 8
    assert qf.shape[-1] == kf.shape[-1] == vf.shape[-1] == 24
    assert scale == pytest.approx(1 / 4)  # the ORIGINAL 1/sqrt(16), not 1/sqrt(24)
    assert torch.equal(qf[..., 16], torch.ones_like(qf[..., 16]))
    assert torch.equal(qf[..., 17:], torch.zeros_like(qf[..., 17:]))
    expected_column = (bias / scale).clamp(min=MASKED_KEY_BIAS / scale)[:, None, :].expand(2, 3, -1)
    torch.testing.assert_close(kf[..., 16], expected_column)
    assert torch.equal(vf[..., 16:], torch.zeros_like(vf[..., 16:]))


def test_bf16_fold_is_close_to_fp32_reference() -> None:
    q, k, v, bias = _inputs(head_dim=64)
    out = folded_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias)
    ref = reference_biased_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), bias)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max().item() / ref.abs().max().item() <= 2e-2


def test_bad_inputs_are_refused() -> None:
    q, k, v, bias = _inputs()
    with pytest.raises(ValueError, match="key_bias"):
        folded_attention(q, k, v, bias[:, :-1])
    bad = bias.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        folded_attention(q, k, v, bad)


def test_fold_traces_with_torch_export_and_keeps_the_zeroing() -> None:
    class Folded(torch.nn.Module):
        def forward(self, q, k, v, bias):
            return folded_attention(q, k, v, bias)

    q, k, v, bias = _inputs()
    batch, keys = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("keys", min=2, max=512)
    shapes = ({0: batch}, {0: batch, 2: keys}, {0: batch, 2: keys}, {0: batch, 1: keys})
    program = torch.export.export(Folded(), (q, k, v, bias), dynamic_shapes=shapes)
    bias[1] = -math.inf
    bias[0, :5] = -math.inf
    out = program.module()(q, k, v, bias)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert (out[0] - reference_biased_attention(q, k, v, bias)[0]).abs().max().item() <= 1e-5
