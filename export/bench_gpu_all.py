"""``unidg bench gpu --all``: one unattended GPU session that yields the decisive table within a fixed time budget.

Everything runs in one process on one GPU with one set of random weights (the full FLUX.1-Fill + Redux preset in
bf16, S = 768). Rows run in order of value; each is written to ``bench_gpu_all.json`` and ``bench_gpu_all.md`` as it
finishes (each file written to a temp name and renamed, so both are always valid), and a row that the remaining
budget cannot hold is recorded as skipped with the reason "budget". The run first records the machine.

Rows, in the order they run (``bench_gpu_all_rows.AllRun.run``):

1. **stock eager step**: diffusers' ``FluxTransformer2DModel`` with its own ``FluxAttnProcessor`` and the key bias as
   an additive float ``attention_mask`` (how a diffusers user passes it), 5849 tokens (no folding), bf16. Every step
   row prints its speed-up over this row; every sample row over the stock sample.
2. **attention alone**: every exact biased form at both token counts (``unidg bench attention``'s measurement):
   cuDNN/flash SDPA with a float mask, the head-dim fold, key groups, the capturable key ranges, FlexAttention with a
   ``score_mod``, the Triton kernel. The fastest capturable form at 5338 tokens is the attention the later rows use.
3. **options, each alone against the same base** (the project's step: folded to 5338 tokens, SDPA float mask,
   eager): the measured attention winner; a CUDA graph (a short loop, per step, with and without capture); FP8
   (``Fp8Transformer``: fused Q/K/V and single-block QKV+MLP-in matmuls, modulation kept bf16, E4M3 row-wise;
   peak memory recorded with the bf16 weights moved off the GPU); ``torch.compile`` (regional, each block).
4. **the fastest combination measured**: compile + the attention winner + FP8 as one step row, then end to end per
   sample (SigLIP + Redux, VAE encode, 28 steps, VAE decode) with the fastest step configuration measured so far,
   captured as a CUDA graph where capture paid and the attention allows it; named in the row.
5. **stock end to end** per sample (same stages, diffusers' ``FlowMatchEulerDiscreteScheduler``, eager), the stock
   step compiled (``compile_repeated_blocks``), end to end under a static step-cache schedule (measured: the gated
   schedule of a bundle manifest or ``--cache-full-steps`` spread evenly), the Triton tile sweep, ``unidg bench
   train``, and the shipped ONNX bundle on onnxruntime's CUDA execution provider where onnxruntime-gpu is present.

``--dry-run`` runs every row on the CPU at the tiny dry-run size (float32, FP8 emulated, the kernel interpreted, no
capture): a check of the harness, not figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from unidg.core.errors import OptionError
from unidg.export.bench_cli import command_line, use_triton_interpreter
from unidg.export.bench_gpu_all_plan import AllResult
from unidg.export.bench_gpu_all_report import format_markdown, write_all_report
from unidg.export.step_cache_fraction import read_static_schedule
from unidg.runtime.cli_options import option_values


def bench_gpu_all(args: argparse.Namespace) -> int:
    """``unidg bench gpu --all``: ``run_all`` with its files rewritten in ``--out`` after every row."""
    if args.dry_run:
        use_triton_interpreter()
    if args.cache_full_steps is not None or args.cache_manifest is not None:
        read_static_schedule(args.cache_full_steps, args.cache_manifest, args.steps or 28)  # refuse bad input first
    command = command_line("unidg bench gpu --all")
    out = Path(args.out)

    def report(partial: AllResult) -> None:
        partial.command = command
        write_all_report(partial, out)

    # The rows import diffusers, which imports triton: they load once --dry-run has set TRITON_INTERPRET.
    from unidg.export.bench_gpu_all_rows import run_all

    try:
        options = ("dry_run", "budget_s", "resolution", "steps", "repeats", "seed", "compile_backend")
        result = run_all(
            **option_values(args, *options, "cache_full_steps", "cache_manifest"),
            report=report,
            only=tuple(word.strip() for word in (args.only or "").split(",") if word.strip()),
        )
    except ValueError as error:
        raise OptionError(str(error)) from error
    json_path, markdown_path = write_all_report(result, out)
    print(format_markdown(result))
    print(f"wrote {json_path} and {markdown_path}")
    return 0
