"""Key bias: layout, folding exactness, padding."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unidg.core.attention_bias import build_key_bias, context_token_count, pad_key_bias, stack_key_biases


def test_folded_layout():
    defect = np.array([False, True, True, False, False, True])
    bias = build_key_bias(defect, num_reference_tokens=3, text_tokens=512, alpha=2.0)
    assert bias.dtype == np.float32 and bias.shape == (1 + 3 + 6,)
    np.testing.assert_allclose(bias[0], math.log(512), rtol=1e-7)
    np.testing.assert_array_equal(bias[1:4], 0)
    np.testing.assert_allclose(bias[4:], np.where(defect, math.log(2.0), 0.0), rtol=1e-7)


def test_unfolded_layout_and_batches():
    defect = np.array([[True, False], [False, False]])
    bias = build_key_bias(defect, num_reference_tokens=2, text_tokens=4, alpha=3.0, fold_text=False)
    assert bias.shape == (2, 4 + 2 + 2)
    np.testing.assert_array_equal(bias[:, :6], 0)
    np.testing.assert_allclose(bias[:, 6:], [[math.log(3.0), 0], [0, 0]], rtol=1e-7)
    assert context_token_count(512, 729) == 730 and context_token_count(512, 729, fold_text=False) == 1241


def test_folding_is_exact_attention():
    # K identical zero-text keys/values == one key with bias log K, for any query
    rng = np.random.default_rng(0)
    text_tokens, references, images, dim = 7, 3, 5, 8
    defect = rng.random(images) < 0.5
    keys_other = rng.standard_normal((references + images, dim))
    values_other = rng.standard_normal((references + images, dim))
    text_key, text_value = rng.standard_normal(dim), rng.standard_normal(dim)
    queries = rng.standard_normal((4, dim))

    def attend(keys, values, bias):
        logits = queries @ keys.T / math.sqrt(dim) + bias
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (weights / weights.sum(axis=1, keepdims=True)) @ values

    full = attend(
        np.vstack([np.tile(text_key, (text_tokens, 1)), keys_other]),
        np.vstack([np.tile(text_value, (text_tokens, 1)), values_other]),
        build_key_bias(defect, references, text_tokens, 2.0, fold_text=False),
    )
    folded = attend(
        np.vstack([text_key, keys_other]),
        np.vstack([text_value, values_other]),
        build_key_bias(defect, references, text_tokens, 2.0, fold_text=True),
    )
    np.testing.assert_allclose(folded, full, rtol=1e-6, atol=1e-6)


def test_padding_appends_minus_infinity():
    bias = build_key_bias(np.array([True, False]), 1, 4, 2.0)
    padded = pad_key_bias(bias, 7)
    assert padded.shape == (7,) and np.isneginf(padded[4:]).all()
    np.testing.assert_array_equal(padded[:4], bias)
    stacked = stack_key_biases([bias, np.zeros(6, np.float32)])
    assert stacked.shape == (2, 6) and np.isneginf(stacked[0, 4:]).all() and np.isfinite(stacked[1]).all()
    with pytest.raises(ValueError, match="more than"):
        pad_key_bias(bias, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="alpha"):
        build_key_bias(np.array([True]), 0, 1, 0.0)
    with pytest.raises(ValueError, match="bool"):
        build_key_bias(np.array([1, 0]), 0, 1, 2.0)
    with pytest.raises(ValueError, match="K >= 1"):
        context_token_count(0, 3)
