"""The FLOP floor of a FLUX step: matmul and attention FLOPs per step, and the dense peaks of the GPUs it runs on."""

from __future__ import annotations

import re

# (GPU name pattern, dense bf16 TFLOP/s, dense FP8 TFLOP/s or None): NVIDIA datasheet figures without sparsity.
# Checked in order; the first pattern that matches torch.cuda.get_device_name() wins.
GPU_PEAKS: tuple[tuple[str, float, float | None], ...] = (
    (r"H100.*PCIe", 756.0, 1513.0),
    (r"H100 NVL", 835.5, 1671.0),
    (r"GH200", 989.4, 1978.9),
    (r"H200", 989.4, 1978.9),
    (r"H100", 989.4, 1978.9),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH20\b", 148.0, 296.0),
    (r"B200", 2250.0, 4500.0),
    (r"L40S", 362.0, 733.0),
    (r"\bL4\b", 121.0, 242.0),
    (r"A100", 312.0, None),
)


def gpu_peaks(name: str) -> tuple[float, float | None] | None:
    """(bf16, FP8) dense TFLOP/s of a GPU by its torch name, or None when it is not in ``GPU_PEAKS``."""
    for pattern, bf16, fp8 in GPU_PEAKS:
        if re.search(pattern, name):
            return bf16, fp8
    return None


def matmul_flops_per_token(num_layers: int, num_single_layers: int, inner_dim: int, mlp_ratio: float = 4.0) -> float:
    """Matmul FLOPs per token of the MM-DiT blocks (2 per multiply-add).

    A double block: each token uses its own stream's Q, K, V, output (4 d^2) and MLP (2 d * 4d) weights. A single
    block: fused QKV + MLP-in (d * (3d + 4d)) and proj_out ((d + 4d) * d). Per-sample matmuls (AdaLN modulation,
    embedders) are left out. FLUX (d = 3072, 19 + 38 blocks): 4.30 + 8.61 = 12.9 GFLOP per token.
    """
    mlp = int(inner_dim * mlp_ratio)
    double = 4 * inner_dim**2 + 2 * inner_dim * mlp
    single = inner_dim * (3 * inner_dim + mlp) + (inner_dim + mlp) * inner_dim
    return 2.0 * (num_layers * double + num_single_layers * single)


def attention_flops_per_step(blocks: int, tokens: int, inner_dim: int) -> float:
    """QK^T and PV over the joint sequence: 4 * N^2 * d per block (d = heads * head_dim = 3072 for FLUX)."""
    return 4.0 * blocks * tokens**2 * inner_dim
