"""Ahead-of-time PTX for sm_80 / sm_89 / sm_90 without a GPU."""

from __future__ import annotations

import math

import pytest

from unidg.export.plugins.aot import (
    DEFAULT_SHARED_BYTES_LIMIT,
    MAX_SHARED_BYTES_BY_ARCH,
    SCRATCH_PARAM_COUNT,
    SUPPORTED_ARCHS,
    AotCompileError,
    compile_biased_attention,
    compile_for_targets,
    kernel_signature,
    parse_ptx_entry,
)
from unidg.export.plugins.attention_kernel import (
    AUTOTUNE_CONFIGS,
    KERNEL_ARG_NAMES,
    interpreter_available,
)

pytestmark = pytest.mark.skipif(
    interpreter_available(), reason="this process imported Triton in interpreter mode (TRITON_INTERPRET=1)"
)

ENTRY = "_biased_attention_fwd"
USER_PARAM_TYPES = ("u64", "u64", "u64", "u64", "u32", "u32", "u32", "u64")


@pytest.fixture(scope="module")
def real_shape_kernels():
    return compile_for_targets(SUPPORTED_ARCHS, dtype="bf16", head_dim=128)


@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_ptx_for_each_target(real_shape_kernels, arch: int) -> None:
    kernel = real_shape_kernels[arch]
    ptx = kernel.ptx
    target = "sm_90a" if arch == 90 else f"sm_{arch}"
    assert f".target {target}" in ptx
    assert kernel.ptx_target == target
    assert kernel.ptx_isa == "8.0"
    name, params = parse_ptx_entry(ptx)
    assert name == kernel.kernel_name == ENTRY
    # 8 kernel arguments (Q, K, V, KeyBias, seq_q, seq_k, num_heads, Out) + global and profile scratch pointers
    assert len(params) == len(KERNEL_ARG_NAMES) + SCRATCH_PARAM_COUNT == 10
    assert params == (*USER_PARAM_TYPES, "u64", "u64")
    assert kernel.scratch_param_count == 2
    assert len(kernel.cubin) > 10_000
    assert kernel.num_warps == AUTOTUNE_CONFIGS[0].num_warps
    assert kernel.block == (kernel.num_warps * 32, 1, 1)
    assert 0 < kernel.shared_mem <= MAX_SHARED_BYTES_BY_ARCH[arch]
    # the default (fast) config needs the opt-in above 48 KiB; the launch docs say so
    assert kernel.needs_shared_opt_in() == (kernel.shared_mem > DEFAULT_SHARED_BYTES_LIMIT)
    assert kernel.compile_seconds < 60


def test_grid_formula_at_the_real_shapes(real_shape_kernels) -> None:
    kernel = real_shape_kernels[90]
    block_m = AUTOTUNE_CONFIGS[0].block_m
    for tokens in (5849, 5338):
        assert kernel.grid(1, 24, tokens) == (math.ceil(tokens / block_m), 24, 1)
    assert kernel.grid(2, 24, 128) == (1, 48, 1)


def test_scale_and_dtype_are_compiled_in() -> None:
    small = AUTOTUNE_CONFIGS[-1]
    fp32 = compile_biased_attention("fp32", head_dim=16, scale=0.25, config=small, arch=80)
    fp16 = compile_biased_attention("fp16", head_dim=16, scale=0.5, config=small, arch=80)
    assert fp32.signature["Q"] == "*fp32" and fp16.signature["Q"] == "*fp16"
    assert fp32.signature["KeyBias"] == fp16.signature["KeyBias"] == "*fp32"
    assert fp32.ptx != fp16.ptx
    assert parse_ptx_entry(fp16.ptx)[1][: len(USER_PARAM_TYPES)] == USER_PARAM_TYPES
    assert fp32.scale == 0.25 and fp16.scale == 0.5


def test_default_scale_and_odd_head_dim() -> None:
    kernel = compile_biased_attention("bf16", head_dim=72, config=AUTOTUNE_CONFIGS[-1], arch=89)
    assert kernel.scale == pytest.approx(1 / math.sqrt(72))
    assert kernel.head_dim == 72


def test_signature_and_refusals() -> None:
    assert list(kernel_signature("bf16")) == list(KERNEL_ARG_NAMES)
    with pytest.raises(ValueError, match="dtype"):
        kernel_signature("fp8")
    with pytest.raises(ValueError, match="scale"):
        compile_biased_attention("bf16", head_dim=16, scale=-1.0, arch=80)
    with pytest.raises(AotCompileError, match="entry"):
        parse_ptx_entry("// no entry here")


def test_old_triton_is_refused() -> None:
    from unidg.export.plugins.aot import check_triton_version

    for old in ("3.3.1", "3.4.0", "2.3.0"):
        with pytest.raises(AotCompileError, match=f"Triton {old} is installed.*>= 3.5"):
            check_triton_version(old)
    check_triton_version("3.5.0")
    check_triton_version("3.9.0+git1234")


def test_metadata_without_launch_fields_is_refused() -> None:
    """Metadata of a Triton that does not report scratch sizes / launch flags cannot pass the launch check."""
    from types import SimpleNamespace

    from unidg.export.plugins.aot import _check_launch_metadata

    complete = {
        "global_scratch_size": 0,
        "profile_scratch_size": 0,
        "num_ctas": 1,
        "launch_cooperative_grid": False,
        "launch_pdl": False,
    }
    _check_launch_metadata(SimpleNamespace(**complete), "kernel")
    for missing in complete:
        partial = {k: v for k, v in complete.items() if k != missing}
        with pytest.raises(AotCompileError, match=f"lacks \\['{missing}'\\]"):
            _check_launch_metadata(SimpleNamespace(**partial), "kernel")
    with pytest.raises(AotCompileError, match="global scratch of 64 bytes"):
        _check_launch_metadata(SimpleNamespace(**{**complete, "global_scratch_size": 64}), "kernel")
