"""Per-key additive attention bias: softmax(Q K^T / sqrt(d) + b[key]) V, the same for every query and head.

Key order is [context; image]. Context = [K zero text tokens ; R reference (Redux) tokens], or with folding
[1 zero text token ; R reference tokens]: the K zero text tokens are one key repeated K times, so one copy with
bias log K gives exactly the same attention. Image keys in the defect region (the reference defect on the left half,
the target region on the right half) get log(alpha) (paper Eqs. 10-12); padded keys get -inf.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def context_token_count(text_tokens: int, num_reference_tokens: int, fold_text: bool = True) -> int:
    """Context tokens ahead of the image tokens: (1 if folded else K) + R."""
    if text_tokens < 1 or num_reference_tokens < 0:
        raise ValueError(f"need K >= 1 and R >= 0, got {text_tokens} and {num_reference_tokens}")
    return (1 if fold_text else text_tokens) + num_reference_tokens


def build_key_bias(
    defect_tokens: np.ndarray,
    num_reference_tokens: int,
    text_tokens: int,
    alpha: float,
    fold_text: bool = True,
) -> np.ndarray:
    """float32 key bias for ``defect_tokens`` (N_img,) or (B, N_img) bool -> (N_ctx + N_img,) or (B, N_ctx + N_img):
    log K on the folded text key (0 when not folded), 0 on reference keys, log(alpha) on defect image keys."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    defect_tokens = np.asarray(defect_tokens)
    if defect_tokens.dtype != np.bool_ or defect_tokens.ndim not in (1, 2):
        raise ValueError(
            f"defect tokens must be bool (N_img,) or (B, N_img), got {defect_tokens.dtype} of {defect_tokens.shape}"
        )
    batched = defect_tokens.reshape(-1, defect_tokens.shape[-1])
    num_context = context_token_count(text_tokens, num_reference_tokens, fold_text)
    bias = np.zeros((batched.shape[0], num_context + batched.shape[1]), dtype=np.float32)
    if fold_text:
        bias[:, 0] = math.log(text_tokens)
    bias[:, num_context:][batched] = math.log(alpha)
    return bias if defect_tokens.ndim == 2 else bias[0]


def pad_key_bias(bias: np.ndarray, length: int) -> np.ndarray:
    """Append -inf keys (padding that no query may attend to) up to ``length`` along the last axis."""
    missing = length - bias.shape[-1]
    if missing < 0:
        raise ValueError(f"bias has {bias.shape[-1]} keys, more than the padded length {length}")
    pad = np.full(bias.shape[:-1] + (missing,), -np.inf, dtype=np.float32)
    return np.concatenate([bias.astype(np.float32), pad], axis=-1)


def stack_key_biases(biases: Sequence[np.ndarray], length: int | None = None) -> np.ndarray:
    """(B, length) from B one-dimensional biases of possibly different lengths, padded with -inf keys."""
    if not biases:
        raise ValueError("no biases to stack")
    length = max(b.shape[-1] for b in biases) if length is None else length
    return np.stack([pad_key_bias(np.asarray(b).reshape(-1), length) for b in biases])
