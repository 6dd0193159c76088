"""The Triton biased-attention kernel against the explicit reference, on CPU under Triton's interpreter.

Triton chooses interpreter or compiler for its own ``triton.language`` helpers when it is first imported, so the kernel
runs in one subprocess started with TRITON_INTERPRET=1; it reports per-case errors as JSON and the tests assert on
them. Nothing in this process depends on TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from unidg.export.bench_attention import SWEEP_TILES
from unidg.export.plugins.attention_kernel import (
    KernelConfig,
    block_d_for,
    check_attention_inputs,
    default_scale,
    interpreter_available,
    launch_grid,
    reference_biased_attention,
)

DTYPES = ("float32", "float16", "bfloat16")
# fp32: max abs error; 16-bit: max abs error divided by max |reference| (output scale).
TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}

# name -> (batch, heads, seq_q, seq_k, head_dim, bias kind, scale)
SHAPE_CASES = {
    "tail_37x37_d32": (1, 2, 37, 37, 32, "random", None),
    "cross_19x50_d16": (2, 1, 19, 50, 16, "random", None),
    "exact_blocks_32x32_d64": (1, 1, 32, 32, 64, "random", None),
    "neg_inf_keys_29x45": (2, 2, 29, 45, 32, "neg_inf", None),
    "all_masked_batch_17x23": (2, 1, 17, 23, 16, "all_masked_batch1", None),
    "single_key_9x1": (1, 2, 9, 1, 16, "random", None),
    "head_dim_24_padded_21x30": (1, 1, 21, 30, 24, "random", None),
    "explicit_scale_0.3": (1, 1, 20, 26, 16, "random", 0.3),
}

SCRIPT = r"""
import json, math, sys
import torch
from unidg.export.plugins.attention_kernel import biased_attention, interpreter_available, reference_biased_attention

assert interpreter_available(), "TRITON_INTERPRET was not honoured"
cases = json.loads(sys.argv[1])
dtypes = json.loads(sys.argv[2])
gen = torch.Generator().manual_seed(1234)


def make_bias(batch, seq_k, kind):
    bias = torch.randn(batch, seq_k, generator=gen) * 1.5
    if kind == "neg_inf":
        # the whole first key block of batch 0 and a scattered third of the rest are padding
        bias[0, :16] = -math.inf
        bias[:, 16:][torch.rand(batch, seq_k - 16, generator=gen) < 0.33] = -math.inf
    elif kind == "all_masked_batch1":
        bias[1] = -math.inf
    return bias


def errors(out, ref):
    out, ref = out.float(), ref.float()
    abs_err = (out - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-6)
    return {"abs": abs_err, "rel": abs_err / scale, "nan": bool(torch.isnan(out).any())}


report = {}
for name, (b, h, sq, sk, d, kind, scale) in cases.items():
    q32 = torch.randn(b, h, sq, d, generator=gen)
    k32 = torch.randn(b, h, sk, d, generator=gen)
    v32 = torch.randn(b, h, sk, d, generator=gen)
    bias = make_bias(b, sk, kind)
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        q, k, v = q32.to(dtype), k32.to(dtype), v32.to(dtype)
        out = biased_attention(q, k, v, bias, scale)
        # the reference sees the same rounded inputs, computed in float32
        ref = reference_biased_attention(q.float(), k.float(), v.float(), bias, scale)
        entry = errors(out, ref)
        entry["dtype_out"] = str(out.dtype)
        if kind == "all_masked_batch1":
            entry["masked_batch_max_abs"] = out[1].float().abs().max().item()
        report[f"{name}/{dtype_name}"] = entry

# Folded text tokens: K identical keys (same key and value) == one key whose bias is increased by log K.
copies, others, d = 8, 21, 16
key = torch.randn(1, 2, 1, d, generator=gen)
value = torch.randn(1, 2, 1, d, generator=gen)
k_rest = torch.randn(1, 2, others, d, generator=gen)
v_rest = torch.randn(1, 2, others, d, generator=gen)
q32 = torch.randn(1, 2, 13, d, generator=gen)
b_rest = torch.randn(1, others, generator=gen)
b_rest[0, -3:] = -math.inf
k_full = torch.cat([key.expand(-1, -1, copies, -1), k_rest], dim=2)
v_full = torch.cat([value.expand(-1, -1, copies, -1), v_rest], dim=2)
b_full = torch.cat([torch.zeros(1, copies), b_rest], dim=1)
k_fold = torch.cat([key, k_rest], dim=2)
v_fold = torch.cat([value, v_rest], dim=2)
b_fold = torch.cat([torch.full((1, 1), math.log(copies)), b_rest], dim=1)
for dtype_name in dtypes:
    dtype = getattr(torch, dtype_name)
    full = biased_attention(q32.to(dtype), k_full.to(dtype), v_full.to(dtype), b_full)
    folded = biased_attention(q32.to(dtype), k_fold.to(dtype), v_fold.to(dtype), b_fold)
    ref = reference_biased_attention(q32.to(dtype).float(), k_full.to(dtype).float(), v_full.to(dtype).float(), b_full)
    entry = errors(full, ref)
    entry["fold_vs_full"] = errors(folded, full)
    report[f"folded_tokens_{copies}x/{dtype_name}"] = entry

print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def interpreter_report() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(SHAPE_CASES), json.dumps(DTYPES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(SHAPE_CASES))
def test_kernel_matches_reference(interpreter_report: dict, case: str, dtype: str) -> None:
    entry = interpreter_report[f"{case}/{dtype}"]
    assert not entry["nan"]
    assert entry["dtype_out"] == f"torch.{dtype}"
    error = entry["abs"] if dtype == "float32" else entry["rel"]
    assert error <= TOLERANCE[dtype], f"{case}/{dtype}: {entry}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_rows_are_zero(interpreter_report: dict, dtype: str) -> None:
    assert interpreter_report[f"all_masked_batch_17x23/{dtype}"]["masked_batch_max_abs"] == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_folded_token_equals_repeated_keys(interpreter_report: dict, dtype: str) -> None:
    entry = interpreter_report[f"folded_tokens_8x/{dtype}"]
    assert not entry["nan"] and not entry["fold_vs_full"]["nan"]
    if dtype == "float32":
        assert entry["abs"] <= 1e-5
        assert entry["fold_vs_full"]["abs"] <= 1e-5
    else:
        assert entry["rel"] <= TOLERANCE[dtype]
        assert entry["fold_vs_full"]["rel"] <= TOLERANCE[dtype]


def test_reference_defines_masked_rows_and_matches_sdpa() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=gen) for n in (5, 7, 7))
    bias = torch.randn(2, 7, generator=gen)
    bias[0, 2] = -math.inf
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])
    torch.testing.assert_close(reference_biased_attention(q, k, v, bias), expected, rtol=0, atol=1e-6)
    bias[1] = -math.inf
    out = reference_biased_attention(q, k, v, bias)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert not torch.isnan(out).any()


def test_launch_geometry() -> None:
    assert launch_grid(1, 24, 5338, 128) == (42, 24, 1)
    assert launch_grid(2, 3, 1, 16) == (1, 6, 1)
    assert [block_d_for(d) for d in (8, 16, 24, 64, 72, 128)] == [16, 16, 32, 64, 128, 128]
    assert default_scale(128) == pytest.approx(1 / math.sqrt(128))


def test_input_validation_names_the_input() -> None:
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="key_bias"):
        check_attention_inputs(q, q, q, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="query"):
        check_attention_inputs(q[0], q, q, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="dtype"):
        check_attention_inputs(q, q.half(), q, torch.zeros(1, 4))


@pytest.mark.skipif(interpreter_available(), reason="this process was started with TRITON_INTERPRET=1")
def test_cpu_launch_without_interpreter_says_how_to_enable_it() -> None:
    from unidg.export.plugins.attention_kernel import biased_attention

    q = torch.zeros(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        biased_attention(q, q, q, torch.zeros(1, 4))


def test_bench_attention_cli_on_cpu(tmp_path) -> None:
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unidg.cli",
            "bench",
            "attention",
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--tile-sweep",
            "--json",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "proves the benchmark harness only" in proc.stdout
    result = json.loads(out.read_text())
    assert result["interpreter"] is True and result["shape"] == "tiny"
    variants = {(row["variant"], row["tokens"]) for row in result["rows"]}
    names = ("triton_biased", "sdpa_no_bias", "sdpa_float_mask", "sdpa_headdim_fold", "sdpa_key_groups")
    names += ("sdpa_key_ranges", "flex_score_mod")
    names += tuple(f"triton {KernelConfig(*tiles).name}" for tiles in SWEEP_TILES)
    assert variants == {(name, tokens) for name in names for tokens in (70, 47)}
    for row in result["rows"]:
        assert row["median_ms"] > 0 and not row["note"].startswith(("failed", "not launched")), row
        if row["variant"] != "sdpa_no_bias":
            assert row["max_abs_diff_vs_mask"] <= 5e-2  # bf16 outputs of the same attention
