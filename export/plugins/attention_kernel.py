"""The biased-attention Triton kernel, defined in ``unidg.runtime.attention_kernel`` (the torch backend runs it too).

Re-exported here for the TensorRT plugin, its ahead-of-time compiler and the attention benchmark.
"""

from unidg.runtime.attention_kernel import (
    AUTOTUNE_CONFIGS,
    INTERPRETER_CONFIG,
    KERNEL_ARG_NAMES,
    LOG2E,
    MIN_BLOCK_D,
    NUM_TENSOR_INPUTS,
    SCALAR_ARG_NAMES,
    KernelConfig,
    biased_attention,
    biased_attention_jit,
    block_d_for,
    check_attention_inputs,
    default_scale,
    dot_in_fp32,
    interpreter_available,
    interpreter_requested,
    launch_grid,
    reference_biased_attention,
    triton_dtype_name,
)

__all__ = [
    "AUTOTUNE_CONFIGS",
    "INTERPRETER_CONFIG",
    "KERNEL_ARG_NAMES",
    "LOG2E",
    "MIN_BLOCK_D",
    "NUM_TENSOR_INPUTS",
    "SCALAR_ARG_NAMES",
    "KernelConfig",
    "biased_attention",
    "biased_attention_jit",
    "block_d_for",
    "check_attention_inputs",
    "default_scale",
    "dot_in_fp32",
    "interpreter_available",
    "interpreter_requested",
    "launch_grid",
    "reference_biased_attention",
    "triton_dtype_name",
]
