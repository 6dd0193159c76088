"""``unidg bench gpu``: the full-scale UniDG step on one CUDA GPU with the torch backend, one prepared command.

The full 57-block FLUX.1-Fill transformer (plus VAE, SigLIP and Redux) is built with random weights directly on the GPU
in bf16 (speed does not depend on weight values), at the UniDG workload: a 768 x 1536 diptych, 4608 image tokens and
512 zero-text + 729 Redux context tokens (5849; 5338 with the text tokens folded, the product's setting). Rows:

1. per step (folded), cumulative: bf16 eager (SDPA with the key bias as a float mask) -> ``torch.compile`` (regional:
   each transformer block, so the 57 identical blocks compile as two) -> + the fused biased attention (the project's
   Triton kernel, ``unidg::biased_attention``) -> + FP8 matmuls (``fp8_linear``: E4M3 row-wise, ``torch._scaled_mm``;
   why not torchao: see ``unidg.runtime.backends.torch_step_options``) -> + the 28-step loop captured as one CUDA graph
   (``GraphRunner``, the wrapper the torch backend uses; per step = loop / 28). Also bf16 eager at 5849 (unfolded).
2. VAE encode (768 x 1536), VAE decode, the image encoder (SigLIP + Redux), and end to end per sample through the
   runtime (``DefectSynthesizer`` on the torch backend with the fastest configuration), with peak GPU memory.
3. attention alone at both token counts: the biased Triton kernel vs fused SDPA without bias (``unidg bench
   attention``'s measurement).
4. achieved vs the FLOP floor: matmuls per token (12.9 GFLOP for FLUX: see ``matmul_flops_per_token``) x tokens
   + attention 4 * N^2 * 3072 per block x 57 blocks, at the GPU's dense peak (``GPU_PEAKS``; FP8 rows count the
   matmuls at the FP8 peak and attention at the bf16 peak).

Each row that fails (a torch/Triton version that rejects a path) records its error and the others still run, so one
GPU session always yields a table. ``--dry-run`` runs every path on the CPU at a tiny size (``dry_run_preset``): FP8
emulated (the same E4M3 quantization and scales, the matmul in float32), the fused kernel under Triton's interpreter,
and the CUDA-graph wrapper without capture (CPU has no graphs: it just runs the loop on its static buffers). Its
timings prove the harness only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unidg.core.errors import OptionError
from unidg.export.bench_cli import command_line, use_triton_interpreter
from unidg.export.bench_gpu_report import GpuBenchResult, format_markdown, write_report
from unidg.runtime.cli_options import option_values


def bench_gpu(args: argparse.Namespace) -> int:
    if args.dry_run:
        use_triton_interpreter()
    command = command_line("unidg bench gpu")

    def report(partial: GpuBenchResult) -> None:  # after every row: a run cut short still leaves its table
        partial.command = command
        write_report(partial, Path(args.out))

    # The rows import diffusers, which imports triton: they load once --dry-run has set TRITON_INTERPRET.
    from unidg.export.bench_gpu_rows import run_gpu_bench

    try:
        result = run_gpu_bench(
            **option_values(args, "dry_run", "resolution", "steps", "repeats", "seed", "compile_backend"),
            compile=not args.no_compile,
            on_row=report,
        )
    except ValueError as error:
        raise OptionError(str(error)) from error
    result.command = command
    json_path, markdown_path = write_report(result, Path(args.out))
    print(format_markdown(result))
    print(f"wrote {json_path} and {markdown_path}")
    return 0
