"""Flash-attention forward with a per-key additive bias, written once in Triton.

    out[b, h, i, :] = sum_j softmax_j(scale * q[b, h, i] . k[b, h, j] + key_bias[b, j]) * v[b, h, j, :]

Layout: Q, K, V and the output are contiguous ``[B, H, S, D]`` (the 4-D form of ONNX opset-23 ``Attention``);
``key_bias`` is contiguous float32 ``[B, S_k]``. Q/K/V may be bfloat16, float16 or float32; the output has Q's dtype.
Softmax statistics and both matmul accumulators are float32.

``-inf`` in ``key_bias`` removes a key (padding). A query row whose keys are *all* ``-inf`` has an empty softmax; this
kernel defines its output as **zeros** (never NaN). ``reference_biased_attention`` implements the same definition.

The same ``@triton.jit`` function serves four callers:
- GPU: ``biased_attention(q, k, v, key_bias)`` on CUDA tensors (``triton.autotune`` over ``AUTOTUNE_CONFIGS``);
- CPU: the same call on CPU tensors runs Triton's interpreter with ``INTERPRETER_CONFIG`` (correctness only);
- ahead-of-time: ``unidg.export.plugins.aot`` compiles it to PTX for the TensorRT plugin;
- the torch backend (``--fused-attention``) calls it as the custom op ``unidg::biased_attention``.

It lives in the runtime because the torch backend runs it; the exporter imports it from here (the runtime never
imports the exporter).

Its runtime arguments are ordered (input pointers, int32 scalars, output pointer) because that is the order in which a
TensorRT ahead-of-time plugin passes them (inputs, ``extra_args``, outputs).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

LOG2E = 1.4426950408889634
MIN_BLOCK_D = 16  # tl.dot needs a reduction dimension of at least 16


@dataclass(frozen=True)
class KernelConfig:
    """One tuning point of the kernel: tile sizes (constexprs) and launch shape."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}"


# A few points around the usual flash-attention optimum for head_dim 128; the first one is the default for AOT. The
# last one needs < 48 KiB of shared memory on sm_80/89/90 (bf16, D = 128), so it launches even where the per-kernel
# dynamic shared-memory limit is not raised.
AUTOTUNE_CONFIGS: tuple[KernelConfig, ...] = (
    KernelConfig(block_m=128, block_n=64, num_warps=8, num_stages=3),
    KernelConfig(block_m=128, block_n=128, num_warps=8, num_stages=2),
    KernelConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),
    KernelConfig(block_m=64, block_n=32, num_warps=4, num_stages=1),
)
# Small tiles keep the numpy interpreter fast and exercise multi-block loops and masked tails on tiny inputs.
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, num_warps=1, num_stages=1)

KERNEL_ARG_NAMES: tuple[str, ...] = ("Q", "K", "V", "KeyBias", "seq_q", "seq_k", "num_heads", "Out")
NUM_TENSOR_INPUTS = 4  # Q, K, V, KeyBias
SCALAR_ARG_NAMES: tuple[str, ...] = ("seq_q", "seq_k", "num_heads")


def _biased_attention_fwd(
    Q,
    K,
    V,
    KeyBias,
    seq_q,
    seq_k,
    num_heads,
    Out,
    SCALE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # grid = (cdiv(seq_q, BLOCK_M), batch * num_heads)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    # 64-bit offsets: batch * heads * seq * dim can exceed 2**31 for large batches.
    q_base = pid_bh.to(tl.int64) * seq_q * HEAD_DIM
    kv_base = pid_bh.to(tl.int64) * seq_k * HEAD_DIM
    bias_base = batch.to(tl.int64) * seq_k

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    dim_ok = offs_d < HEAD_DIM

    q = tl.load(
        Q + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    # Work in base 2: exp(x) = exp2(x * log2(e)); the scale is folded into one multiplier.
    qk_scale = SCALE * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seq_k, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < seq_k
        k = tl.load(
            K + kv_base + cols[None, :] * HEAD_DIM + offs_d[:, None],
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )
        if DOT_IN_FP32:
            qk = tl.dot(q.to(tl.float32), k.to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, k)
        # Tail keys get -inf like padded keys, so both are handled by the same masking below.
        bias = tl.load(KeyBias + bias_base + cols, mask=col_ok, other=float("-inf"))
        s = qk * qk_scale + (bias * 1.4426950408889634)[None, :]

        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While every key seen so far is -inf, subtract 0 instead of -inf so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]

        v = tl.load(
            V + kv_base + cols[:, None] * HEAD_DIM + offs_d[None, :],
            mask=col_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        # P is rounded to V's dtype as the 16-bit tensor-core path requires (a no-op for float32).
        p_v = p.to(V.dtype.element_ty)
        if DOT_IN_FP32:
            acc = tl.dot(p_v.to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p_v, v, acc)
        m_i = m_new

    # Rows whose keys are all -inf have l_i == 0: defined output is 0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        Out + q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


# The compiled form (GPU launches and ahead-of-time compilation). Built explicitly rather than with @triton.jit so
# the choice between compiler and interpreter is made per launch, not by the environment at import time.
biased_attention_jit = triton.JITFunction(_biased_attention_fwd)


def block_d_for(head_dim: int) -> int:
    """Padded head dimension the kernel tiles with (power of two, at least 16)."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return max(MIN_BLOCK_D, triton.next_power_of_2(head_dim))


def default_scale(head_dim: int) -> float:
    """The softmax scale used when none is given: 1/sqrt(head_dim)."""
    return 1.0 / math.sqrt(head_dim)


def launch_grid(batch, num_heads, seq_q, block_m: int, cdiv=None) -> tuple:
    """Grid of the kernel: (query blocks, batch * heads, 1).

    Works on ints and, given TensorRT's ``cdiv``, on symbolic shape expressions, so the TensorRT plugin and the torch
    launcher share one formula.
    """
    if cdiv is None:
        cdiv = triton.cdiv
    return (cdiv(seq_q, block_m), batch * num_heads, 1)


def interpreter_requested() -> bool:
    """True when TRITON_INTERPRET asks for the interpreter (read at launch time, not import time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_available() -> bool:
    """Whether Triton was imported in interpreter mode.

    Triton decides at import time whether its own ``triton.language`` helpers (``tl.zeros``, ``tl.sum``, ...) are
    compiled or interpreted, so the interpreter only works in a process that set TRITON_INTERPRET=1 before the first
    ``import triton``.
    """
    return type(tl.zeros).__name__ == "InterpretedFunction"


def dot_in_fp32(dtype_name: str, interpreted: bool) -> bool:
    """Value of the DOT_IN_FP32 constexpr.

    float32 inputs use exact IEEE dots (not TF32). Under the interpreter, bfloat16 operands are widened right before
    each dot because Triton 3.9's interpreter multiplies bfloat16 storage bits as integers; the operands were already
    rounded to bfloat16, so the widened dot sees the same values the tensor-core dot does.
    """
    return dtype_name == "fp32" or (interpreted and dtype_name == "bf16")


@lru_cache(maxsize=1)
def _interpreted_kernel():
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(_biased_attention_fwd)


@lru_cache(maxsize=1)
def _autotuned_kernel():
    configs = [
        triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps, num_stages=c.num_stages)
        for c in AUTOTUNE_CONFIGS
    ]
    return triton.autotune(configs=configs, key=["seq_q", "seq_k", "HEAD_DIM", "SCALE", "DOT_IN_FP32"])(
        biased_attention_jit
    )


def triton_dtype_name(dtype: torch.dtype) -> str:
    """Triton's name of a torch floating dtype the kernel supports."""
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
    if dtype not in names:
        raise ValueError(f"the kernel supports bfloat16, float16 and float32, got {dtype}")
    return names[dtype]


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor) -> None:
    """Raise ValueError naming the offending input when shapes or dtypes do not fit the kernel."""
    import torch

    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"{name} must be bfloat16, float16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(
            f"key/value must be [batch={batch}, heads={heads}, seq_k, head_dim={head_dim}] and equal; "
            f"got key {tuple(k.shape)}, value {tuple(v.shape)}"
        )
    if key_bias.shape != (batch, k.shape[2]):
        raise ValueError(f"key_bias must be [batch, seq_k] = [{batch}, {k.shape[2]}], got {tuple(key_bias.shape)}")
    if len({q.device, k.device, v.device, key_bias.device}) != 1:
        raise ValueError("query, key, value and key_bias must be on the same device")


def biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    scale: float | None = None,
    *,
    interpret: bool | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """softmax(scale * q k^T + key_bias[:, None, None, :]) v with the Triton kernel.

    q: [B, H, S_q, D]; k, v: [B, H, S_k, D]; key_bias: [B, S_k] (any float dtype, used as float32). ``scale`` defaults
    to 1/sqrt(D). ``interpret`` forces (True) or forbids (False) Triton's CPU interpreter; by default it is used for
    CPU tensors or when TRITON_INTERPRET=1. ``config`` pins one tile configuration instead of autotuning.
    """
    import torch

    check_attention_inputs(q, k, v, key_bias)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scale = default_scale(head_dim) if scale is None else float(scale)
    use_interpreter = (q.device.type == "cpu" or interpreter_requested()) if interpret is None else interpret
    if not use_interpreter and q.device.type != "cuda":
        raise ValueError(f"the compiled kernel needs CUDA tensors, got device {q.device}; pass interpret=True")

    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    bias = key_bias.to(torch.float32).contiguous()
    out = torch.empty_like(q)
    if seq_q == 0 or batch * heads == 0:
        return out
    meta = {
        "SCALE": scale,
        "HEAD_DIM": head_dim,
        "BLOCK_D": block_d_for(head_dim),
        "DOT_IN_FP32": dot_in_fp32(triton_dtype_name(q.dtype), use_interpreter),
    }
    args = (q, k, v, bias, seq_q, seq_k, heads, out)

    if use_interpreter:
        if not interpreter_available():
            raise RuntimeError(
                "Triton's CPU interpreter needs TRITON_INTERPRET=1 in the environment before triton is first "
                "imported; start the process with TRITON_INTERPRET=1 (e.g. `TRITON_INTERPRET=1 python ...`)"
            )
        cfg = config or INTERPRETER_CONFIG
        grid = launch_grid(batch, heads, seq_q, cfg.block_m)
        _interpreted_kernel()[grid](*args, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, **meta)
    elif config is not None:
        grid = launch_grid(batch, heads, seq_q, config.block_m)
        biased_attention_jit[grid](
            *args,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
            **meta,
        )
    else:
        _autotuned_kernel()[lambda m: launch_grid(batch, heads, seq_q, m["BLOCK_M"])](*args, **meta)
    return out


def reference_biased_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit (materialized-scores) definition in float32, with the kernel's all-masked-row rule (output 0)."""
    import torch

    check_attention_inputs(q, k, v, key_bias)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    qf, kf, vf = q.float(), k.float(), v.float()
    scores = torch.matmul(qf, kf.transpose(-1, -2)) * scale + key_bias.float()[:, None, None, :]
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, vf) / torch.where(total == 0, torch.ones_like(total), total)
    return out.to(q.dtype)
