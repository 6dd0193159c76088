"""TensorRT plugin ``unidg::biased_attention``: the Triton kernel as an ahead-of-time quickly deployable plugin.

Built only with NVIDIA's documented ``tensorrt.plugin`` API (``aot_impl`` exists from TensorRT 10.9; the bundle graphs
around the node need the ONNX parser of TensorRT >= 10.15):

- ``@trtp.register``: inputs ``q, k, v`` ``[B, H, S, D]`` (bf16/fp16/fp32) and ``key_bias`` ``[B, S_k]`` fp32, one
  float attribute ``scale`` (0 means 1/sqrt(D)); the output is described as ``q.like()``.
- ``@trtp.autotune``: the supported type combinations (Q/K/V/out share bf16|fp16|fp32, the bias is fp32, all LINEAR)
  and one custom tactic per kernel configuration, so TensorRT times the configurations and keeps the fastest.
- ``@trtp.aot_impl``: compiles the kernel for the build GPU to PTX and returns (kernel name, PTX,
  ``KernelLaunchParams``, ``SymIntExprs``). The grid is symbolic in the input shapes; the extra int32 arguments are
  ``(seq_q, seq_k, num_heads)``, which TensorRT places between the input pointers and the output pointer, matching
  the kernel's argument order. Triton's two trailing scratch pointers are not extra arguments (extra arguments are
  int32 and sit before the outputs): TensorRT fills the kernel parameters it was not given with null, and the kernel
  is checked at compile time to use no scratch.

The PTX is embedded in the serialized engine, so ``trtexec --loadEngine`` or a C++ host runs the engine with no
Python and no plugin library. Building the engine needs this module (``register_plugin()`` before parsing the ONNX).

This module imports without TensorRT (and without Triton): only ``register_plugin`` imports them. It deliberately has
no ``from __future__ import annotations``: ``tensorrt.plugin`` inspects the decorated functions' annotations as
objects.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from unidg.runtime.backends.tensorrt_engines import tensorrt_version_problem

PLUGIN_NAMESPACE = "unidg"
PLUGIN_NAME = "biased_attention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_VERSION = "1"

# trt.DataType member names -> Triton element types the kernel is compiled for.
TRT_TO_TRITON_DTYPE = {"BF16": "bf16", "HALF": "fp16", "FLOAT": "fp32"}
# The same types as AutoTuneCombination spells them.
AUTOTUNE_TYPE_NAMES = {"bf16": "BF16", "fp16": "FP16", "fp32": "FP32"}

# Dynamic shared memory every kernel launch gets without raising CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
# which neither tensorrt.plugin nor Torch-TensorRT documents doing for AOT kernels.
DEFAULT_MAX_SHARED_BYTES = 49152

_registered_options: dict | None = None


def triton_dtype_for(trt_dtype_name: str) -> str:
    """Triton element type for a ``trt.DataType`` name (``"BF16"``, ``"HALF"``, ``"FLOAT"``)."""
    try:
        return TRT_TO_TRITON_DTYPE[trt_dtype_name]
    except KeyError:
        raise ValueError(
            f"{PLUGIN_ID} supports Q/K/V of type {sorted(TRT_TO_TRITON_DTYPE)}, got {trt_dtype_name}"
        ) from None


def resolve_scale(scale: float, head_dim: int) -> float:
    """The softmax scale from the plugin attribute: a positive value is used as is, 0 means 1/sqrt(head_dim)."""
    scale = float(scale)
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{PLUGIN_ID}: scale attribute must be finite and >= 0 (0 = 1/sqrt(D)), got {scale}")
    if head_dim < 1:
        raise ValueError(f"{PLUGIN_ID}: head_dim must be positive, got {head_dim}")
    return scale if scale > 0 else 1.0 / math.sqrt(head_dim)


def static_head_dim(q_dims: Sequence[int]) -> int:
    """Head size from Q's build-time dims ([B, H, S, D]); it must be static because it is compiled into the kernel."""
    dims = tuple(int(d) for d in q_dims)
    if len(dims) != 4:
        raise ValueError(f"{PLUGIN_ID}: q must be 4-D [B, H, S, D], got dims {dims}")
    if dims[3] < 1:
        raise ValueError(f"{PLUGIN_ID}: the head size (last dim of q) must be static, got {dims[3]}")
    return dims[3]


def tactic_configs(configs=None) -> dict:
    """Custom tactic id (1, 2, ...) -> KernelConfig. Tactic 0 (TensorRT's default) maps to the first config."""
    if configs is None:
        # The Triton kernel's modules import triton: they load when a plan is built, not with this module.
        from unidg.export.plugins.attention_kernel import AUTOTUNE_CONFIGS

        configs = AUTOTUNE_CONFIGS
    table = {index + 1: config for index, config in enumerate(configs)}
    if not table:
        raise ValueError("at least one kernel configuration is needed")
    return table


def config_for_tactic(
    tactic: int,
    configs=None,
    max_shared_bytes: int | None = None,
    dtype: str = "",
    head_dim: int = 0,
    scale: float = 0.0,
    arch: int | None = None,
    ptx_version: int | None = 80,
):
    """The kernel config of a tactic; tactic 0 (TensorRT's default) is the first config allowed by
    ``max_shared_bytes`` (checking it compiles the configs for ``dtype``/``head_dim``/``scale`` on sm_``arch``,
    None: the build GPU)."""
    table = tactic_configs(configs)
    if tactic == 0:
        if max_shared_bytes is None:
            return table[1]
        allowed = tactics_within_shared_limit(dtype, head_dim, scale, configs, max_shared_bytes, arch, ptx_version)
        if not allowed:
            raise ValueError(f"{PLUGIN_ID}: no kernel configuration fits {max_shared_bytes} bytes of shared memory")
        return table[allowed[0]]
    try:
        return table[int(tactic)]
    except KeyError:
        raise ValueError(f"{PLUGIN_ID}: unknown tactic {tactic}; known {sorted(table)}") from None


@dataclass(frozen=True)
class LaunchPlan:
    """What ``aot_impl`` hands TensorRT besides the PTX, as plain values or symbolic expressions."""

    grid: tuple  # (x, y, z)
    block: tuple  # (x, y, z)
    shared_mem: int
    extra_args: tuple  # int32 kernel arguments between the input and output pointers


def plan_launch(compiled, q_shape: Sequence, k_shape: Sequence, cdiv=None) -> LaunchPlan:
    """Launch plan of a compiled kernel for Q/K shapes given as ints or TensorRT ``ShapeExpr`` (with ``trtp.cdiv``)."""
    from unidg.export.plugins.attention_kernel import SCALAR_ARG_NAMES

    batch, heads, seq_q = q_shape[0], q_shape[1], q_shape[2]
    values = {"seq_q": seq_q, "seq_k": k_shape[2], "num_heads": heads}
    return LaunchPlan(
        grid=compiled.grid(batch, heads, seq_q, cdiv=cdiv),
        block=compiled.block,
        shared_mem=compiled.shared_mem,
        extra_args=tuple(values[name] for name in SCALAR_ARG_NAMES),
    )


def compile_for_plugin(
    dtype: str, head_dim: int, scale: float, config, arch: int | None = None, ptx_version: int | None = 80
):
    """Compile (once per distinct kernel) the kernel variant a tactic needs; ``arch=None``: the build GPU.

    autotune and aot_impl both ask for it, with arguments spelled differently (defaults left out, keywords or not):
    the cache key is the normalized argument tuple, so one kernel is compiled once."""
    return _compile_once(str(dtype), int(head_dim), float(scale), config, arch, ptx_version)


@lru_cache(maxsize=64)
def _compile_once(dtype: str, head_dim: int, scale: float, config, arch: int | None, ptx_version: int | None):
    from unidg.export.plugins.aot import compile_biased_attention

    return compile_biased_attention(dtype, head_dim, scale, config, arch=arch, ptx_version=ptx_version)


def tactics_within_shared_limit(
    dtype: str,
    head_dim: int,
    scale: float,
    configs,
    max_shared_bytes: int | None,
    arch: int | None = None,
    ptx_version: int | None = 80,
) -> list:
    """Tactic ids whose compiled kernel fits ``max_shared_bytes`` (all of them when the limit is None)."""
    table = tactic_configs(configs)
    if max_shared_bytes is None:
        return sorted(table)
    return [
        tactic
        for tactic, config in sorted(table.items())
        if compile_for_plugin(dtype, head_dim, scale, config, arch, ptx_version).shared_mem <= max_shared_bytes
    ]


def register_plugin(
    configs=None, max_shared_bytes: int | None = DEFAULT_MAX_SHARED_BYTES, ptx_version: int | None = 80
) -> str:
    """Register ``unidg::biased_attention`` with TensorRT's plugin registry (idempotent) and return its id.

    ``configs``: kernel configurations offered as tactics (default: ``AUTOTUNE_CONFIGS``). ``max_shared_bytes``:
    only offer tactics needing at most this much dynamic shared memory (default 48 KiB, what a launch gets without
    the opt-in attribute; None offers every config). ``ptx_version``: PTX ISA stamped into the embedded PTX.
    """
    global _registered_options
    options = {"configs": tuple(tactic_configs(configs).values()), "max_shared_bytes": max_shared_bytes}
    options["ptx_version"] = ptx_version
    if _registered_options is not None:
        if _registered_options != options:
            raise ValueError(f"{PLUGIN_ID} is already registered with different options in this process")
        return PLUGIN_ID

    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as error:
        raise ImportError(f"{PLUGIN_ID} needs TensorRT >= 10.15 (`pip install 'unidg[tensorrt]'`): {error}") from error

    problem = tensorrt_version_problem(trt.__version__)
    if problem or not hasattr(trtp, "aot_impl"):
        raise ImportError(problem or f"{PLUGIN_ID} needs tensorrt.plugin.aot_impl; found TensorRT {trt.__version__}")

    configs = options["configs"]

    @trtp.register(PLUGIN_ID)
    def biased_attention_desc(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, key_bias: trtp.TensorDesc, scale: float
    ) -> trtp.TensorDesc:
        if len(q.shape_expr) != 4 or len(k.shape_expr) != 4 or len(v.shape_expr) != 4:
            raise ValueError(f"{PLUGIN_ID}: q, k and v must be 4-D [B, H, S, D]")
        if len(key_bias.shape_expr) != 2:
            raise ValueError(f"{PLUGIN_ID}: key_bias must be 2-D [B, S_k]")
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def biased_attention_autotune(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        key_bias: trtp.TensorDesc,
        scale: float,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:
        head_dim = static_head_dim(tuple(q.shape))
        resolved = resolve_scale(scale, head_dim)
        combinations = []
        for dtype, type_name in AUTOTUNE_TYPE_NAMES.items():
            tactics = tactics_within_shared_limit(
                dtype, head_dim, resolved, configs, max_shared_bytes, None, ptx_version
            )
            if tactics:
                io_types = f"{type_name}, {type_name}, {type_name}, FP32, {type_name}"
                combinations.append(trtp.AutoTuneCombination(io_types, "LINEAR", tactics))
        if not combinations:
            raise ValueError(f"{PLUGIN_ID}: no kernel configuration fits {max_shared_bytes} bytes of shared memory")
        return combinations

    @trtp.aot_impl(PLUGIN_ID)
    def biased_attention_aot_impl(
        q: trtp.TensorDesc,
        k: trtp.TensorDesc,
        v: trtp.TensorDesc,
        key_bias: trtp.TensorDesc,
        scale: float,
        outputs: tuple[trtp.TensorDesc],
        tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        dtype = triton_dtype_for(q.dtype.name)
        head_dim = static_head_dim(tuple(q.shape))
        resolved = resolve_scale(scale, head_dim)
        config = config_for_tactic(tactic, configs, max_shared_bytes, dtype, head_dim, resolved, None, ptx_version)
        compiled = compile_for_plugin(dtype, head_dim, resolved, config, None, ptx_version)
        plan = plan_launch(compiled, q.shape_expr, k.shape_expr, cdiv=trtp.cdiv)

        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y, launch.grid_z = plan.grid
        launch.block_x, launch.block_y, launch.block_z = plan.block
        launch.shared_mem = plan.shared_mem
        extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(value) for value in plan.extra_args])
        return compiled.kernel_name.encode(), compiled.ptx.encode(), launch, extra_args

    _registered_options = options
    return PLUGIN_ID
