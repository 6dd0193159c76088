"""Ahead-of-time compilation of the biased-attention kernel to PTX, with no GPU present.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers the one Triton kernel of
``attention_kernel`` for a named architecture (sm_80, sm_89, sm_90) and returns PTX plus a cubin. The PTX is what the
TensorRT plugin embeds in the engine.

Kernel ABI (what a host must pass, in order): the 8 user arguments ``Q, K, V, KeyBias`` (device pointers),
``seq_q, seq_k, num_heads`` (int32), ``Out`` (device pointer), then 2 pointers Triton appends to every kernel:
the global scratch and the profile scratch buffer. This kernel needs neither (both sizes are checked to be 0 at
compile time), so a host passes null for them. TensorRT's AOT plugin path passes only the user arguments and fills
the parameters it was not given with null (NVIDIA's Torch-TensorRT ``triton_op`` relies on this), which is exactly
what a kernel with zero-sized scratch expects.

Launch: grid = (ceil(seq_q / BLOCK_M), batch * num_heads, 1), block = (num_warps * 32, 1, 1), dynamic shared memory
= ``shared_mem`` bytes. Above 48 KiB a raw CUDA launch must first raise the kernel's
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (Triton's own launcher does).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from unidg.export.plugins.attention_kernel import (
    AUTOTUNE_CONFIGS,
    KERNEL_ARG_NAMES,
    KernelConfig,
    biased_attention_jit,
    block_d_for,
    default_scale,
    dot_in_fp32,
    interpreter_available,
    launch_grid,
)

SUPPORTED_ARCHS: tuple[int, ...] = (80, 89, 90)
# PTX ISA 8.0 (CUDA 12.0): the oldest ISA that covers sm_90a, so any r525+ driver can JIT the embedded PTX. Triton
# would otherwise stamp the ISA of its bundled ptxas (8.8 / 9.4 with Triton 3.9), which older drivers reject.
DEFAULT_PTX_VERSION = 80
SCRATCH_PARAM_COUNT = 2  # global scratch, profile scratch
DTYPE_NAMES: tuple[str, ...] = ("bf16", "fp16", "fp32")
# Opt-in dynamic shared memory per block (bytes): a compiled config must fit the target.
MAX_SHARED_BYTES_BY_ARCH: dict[int, int] = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DEFAULT_SHARED_BYTES_LIMIT = 49152  # without the opt-in attribute
# The compiled-kernel metadata this module checks (global/profile scratch sizes, launch flags) exists from Triton 3.5.
MIN_TRITON_VERSION = (3, 5)
LAUNCH_METADATA = ("global_scratch_size", "profile_scratch_size", "num_ctas", "launch_cooperative_grid", "launch_pdl")


class AotCompileError(RuntimeError):
    """The kernel could not be compiled into a form the TensorRT AOT launch path can run."""


@dataclass(frozen=True)
class CompiledAttentionKernel:
    """One PTX variant of the kernel with everything a launcher needs."""

    kernel_name: str
    ptx: str
    cubin: bytes
    arch: int
    ptx_target: str  # the PTX ``.target`` directive, e.g. "sm_90a"
    ptx_isa: str  # the PTX ``.version`` directive, e.g. "8.0"
    ptx_param_types: tuple[str, ...]  # ``.param`` types of the entry, in order
    dtype: str
    head_dim: int
    scale: float
    config: KernelConfig
    num_warps: int
    shared_mem: int
    signature: dict[str, str] = field(repr=False)
    compile_seconds: float = 0.0

    @property
    def block(self) -> tuple[int, int, int]:
        return (self.num_warps * 32, 1, 1)

    @property
    def user_param_count(self) -> int:
        return len(KERNEL_ARG_NAMES)

    @property
    def scratch_param_count(self) -> int:
        return len(self.ptx_param_types) - self.user_param_count

    def grid(self, batch, num_heads, seq_q, cdiv=None) -> tuple:
        """Launch grid for these shapes (ints, or TensorRT shape expressions with ``cdiv=trtp.cdiv``)."""
        return launch_grid(batch, num_heads, seq_q, self.config.block_m, cdiv=cdiv)

    def needs_shared_opt_in(self) -> bool:
        return self.shared_mem > DEFAULT_SHARED_BYTES_LIMIT


def kernel_signature(dtype: str) -> dict[str, str]:
    """Triton signature of the runtime arguments (constexprs excluded) for Q/K/V/Out of ``dtype``."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {DTYPE_NAMES}, got {dtype!r}")
    pointer = f"*{dtype}"
    return {
        "Q": pointer,
        "K": pointer,
        "V": pointer,
        "KeyBias": "*fp32",
        "seq_q": "i32",
        "seq_k": "i32",
        "num_heads": "i32",
        "Out": pointer,
    }


def kernel_constexprs(dtype: str, head_dim: int, scale: float, config: KernelConfig) -> dict[str, object]:
    return {
        "SCALE": float(scale),
        "HEAD_DIM": int(head_dim),
        "BLOCK_D": block_d_for(head_dim),
        "BLOCK_M": config.block_m,
        "BLOCK_N": config.block_n,
        "DOT_IN_FP32": dot_in_fp32(dtype, interpreted=False),
    }


_ENTRY_RE = re.compile(r"\.visible\s+\.entry\s+([A-Za-z_$][\w$]*)\s*\((.*?)\)", re.S)
_PARAM_RE = re.compile(r"\.param\s+\.(\w+)")


def parse_ptx_entry(ptx: str) -> tuple[str, tuple[str, ...]]:
    """(entry name, parameter types) of the single ``.entry`` in ``ptx``."""
    entries = _ENTRY_RE.findall(ptx)
    if len(entries) != 1:
        raise AotCompileError(f"expected exactly one .entry in the PTX, found {len(entries)}")
    name, params = entries[0]
    return name, tuple(_PARAM_RE.findall(params))


def _ptx_directive(ptx: str, directive: str) -> str:
    match = re.search(rf"^\s*\.{directive}\s+(\S+)", ptx, re.M)
    if match is None:
        raise AotCompileError(f"PTX has no .{directive} directive")
    return match.group(1)


def check_triton_version(version: str) -> None:
    """Refuse a Triton older than the AOT path needs (its kernel metadata lacks the launch fields checked here)."""
    parts = tuple(int("".join(ch for ch in piece if ch.isdigit()) or 0) for piece in str(version).split(".")[:2])
    if parts < MIN_TRITON_VERSION:
        needed = ".".join(str(part) for part in MIN_TRITON_VERSION)
        raise AotCompileError(
            f"Triton {version} is installed; ahead-of-time compilation of the attention plugin needs Triton >= "
            f"{needed} (its compiled metadata reports scratch sizes and launch flags); `pip install -U triton`"
        )


def _check_launch_metadata(metadata, name: str) -> None:
    """Refuse kernels that need launch features the TensorRT AOT path (inputs, int32 args, outputs) cannot give."""
    absent = [field for field in LAUNCH_METADATA if not hasattr(metadata, field)]
    if absent:
        raise AotCompileError(
            f"kernel {name}: the compiled metadata lacks {absent}, so its launch needs cannot be checked; "
            f"use Triton >= {'.'.join(str(part) for part in MIN_TRITON_VERSION)}"
        )
    problems = []
    if metadata.global_scratch_size:
        problems.append(f"global scratch of {metadata.global_scratch_size} bytes")
    if metadata.profile_scratch_size:
        problems.append(f"profile scratch of {metadata.profile_scratch_size} bytes")
    if metadata.num_ctas != 1:
        problems.append(f"num_ctas={metadata.num_ctas}")
    if metadata.launch_cooperative_grid:
        problems.append("a cooperative launch")
    if metadata.launch_pdl:
        problems.append("programmatic dependent launch")
    if getattr(metadata, "tensordesc_meta", None):
        problems.append("host-side tensor descriptors")
    if problems:
        raise AotCompileError(f"kernel {name} needs {', '.join(problems)}; the plugin launch path cannot provide that")


def compile_biased_attention(
    dtype: str = "bf16",
    head_dim: int = 128,
    scale: float | None = None,
    config: KernelConfig = AUTOTUNE_CONFIGS[0],
    arch: int | None = None,
    ptx_version: int | None = DEFAULT_PTX_VERSION,
    pointer_alignment: int = 16,
) -> CompiledAttentionKernel:
    """Compile the kernel for one architecture (sm_<arch>); ``arch=None`` means the GPU of this process.

    ``pointer_alignment`` (16 or 1) promises the compiler that every tensor's base address is a multiple of 16 bytes,
    which lets it vectorize loads; TensorRT and PyTorch allocations are 256-byte aligned. ``ptx_version`` pins the PTX
    ISA (``None``: whatever Triton's ptxas supports).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    check_triton_version(triton.__version__)
    if interpreter_available():
        raise AotCompileError("ahead-of-time compilation needs a process started without TRITON_INTERPRET=1")
    if pointer_alignment not in (1, 16):
        raise ValueError(f"pointer_alignment must be 1 or 16, got {pointer_alignment}")
    scale = default_scale(head_dim) if scale is None else float(scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if arch is None:
        target = triton.runtime.driver.active.get_current_target()
        if target.backend != "cuda":
            raise AotCompileError(f"the current Triton target is {target.backend!r}, not cuda; pass arch=80/89/90")
        arch = int(target.arch)
    target = GPUTarget("cuda", int(arch), 32)

    signature = kernel_signature(dtype)
    pointer_indices = [i for i, t in enumerate(signature.values()) if t.startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_indices} if pointer_alignment == 16 else {}
    source = ASTSource(biased_attention_jit, signature, kernel_constexprs(dtype, head_dim, scale, config), attrs=attrs)
    options: dict[str, object] = {
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "enable_fp_fusion": True,
    }
    if ptx_version is not None:
        options["ptx_version"] = int(ptx_version)

    started = time.perf_counter()
    compiled = triton.compile(source, target=target, options=options)
    seconds = time.perf_counter() - started

    metadata = compiled.metadata
    _check_launch_metadata(metadata, metadata.name)
    ptx = compiled.asm["ptx"]
    entry_name, param_types = parse_ptx_entry(ptx)
    if entry_name != metadata.name:
        raise AotCompileError(f"PTX entry {entry_name!r} differs from the compiled kernel name {metadata.name!r}")
    expected_user = tuple("u64" if t.startswith("*") else "u32" for t in signature.values())
    extra_params = param_types[len(expected_user) :]
    if param_types[: len(expected_user)] != expected_user or len(extra_params) > SCRATCH_PARAM_COUNT:
        raise AotCompileError(
            f"PTX parameters {param_types} do not start with the kernel's arguments {expected_user} followed by at "
            f"most {SCRATCH_PARAM_COUNT} scratch pointers"
        )
    shared_limit = MAX_SHARED_BYTES_BY_ARCH.get(int(arch))
    if shared_limit is not None and metadata.shared > shared_limit:
        raise AotCompileError(
            f"config {config.name} needs {metadata.shared} bytes of shared memory; sm_{arch} allows {shared_limit}"
        )
    return CompiledAttentionKernel(
        kernel_name=metadata.name,
        ptx=ptx,
        cubin=compiled.asm["cubin"],
        arch=int(arch),
        ptx_target=_ptx_directive(ptx, "target"),
        ptx_isa=_ptx_directive(ptx, "version"),
        ptx_param_types=param_types,
        dtype=dtype,
        head_dim=int(head_dim),
        scale=scale,
        config=config,
        num_warps=int(metadata.num_warps),
        shared_mem=int(metadata.shared),
        signature=signature,
        compile_seconds=seconds,
    )


def compile_for_targets(
    archs: tuple[int, ...] = SUPPORTED_ARCHS,
    dtype: str = "bf16",
    head_dim: int = 128,
    scale: float | None = None,
    config: KernelConfig = AUTOTUNE_CONFIGS[0],
    ptx_version: int | None = DEFAULT_PTX_VERSION,
) -> dict[int, CompiledAttentionKernel]:
    """One compiled kernel per architecture."""
    return {
        arch: compile_biased_attention(dtype, head_dim, scale, config, arch=arch, ptx_version=ptx_version)
        for arch in archs
    }
