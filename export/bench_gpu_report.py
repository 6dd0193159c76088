"""The records and the report of ``unidg bench gpu``: ``bench_gpu.json`` and ``bench_gpu.md``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from unidg.core.manifest import atomic_write_text
from unidg.core.markdown import table_head


@dataclass
class Row:
    name: str
    tokens: int | None = None
    median_ms: float | None = None
    min_ms: float | None = None
    peak_memory_gib: float | None = None
    floor_fraction: float | None = None  # FLOP-floor time / measured time
    note: str = ""
    error: str = ""


@dataclass
class GpuBenchResult:
    device: str
    device_name: str
    date: str
    dry_run: bool
    preset: str
    resolution: int
    steps: int
    repeats: int
    dtype: str = "bf16"
    versions: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    flops: dict = field(default_factory=dict)
    peaks_tflops: dict | None = None
    rows: list[Row] = field(default_factory=list)
    attention: dict | None = None
    note: str = ""
    command: str = ""
    complete: bool = False  # False while rows are still being measured (partial reports)

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def format_markdown(result: GpuBenchResult) -> str:
    """The markdown table docs/performance.md records."""
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items())
    lines = [
        f"### {result.device_name}, {result.date}"
        + (" (dry run, not figures)" if result.dry_run else "")
        + ("" if result.complete else " (incomplete: the run stopped before its last row)"),
        "",
        f"Command: `{result.command}`. {result.preset} preset (random weights), {result.dtype}, "
        f"S = {result.resolution} "
        f"({result.tokens.get('image')} image tokens; {result.tokens.get('unfolded')} tokens, "
        f"{result.tokens.get('folded')} folded), {result.steps} steps, median of {result.repeats}. {versions}.",
    ]
    if result.note:
        lines += ["", result.note]
    if result.peaks_tflops:
        lines += [
            "",
            f"Peaks used for the floor: {result.peaks_tflops['bf16']} TFLOP/s bf16, "
            f"{result.peaks_tflops['fp8']} TFLOP/s FP8 (dense).",
        ]
    lines += [
        "",
        *table_head("row", "tokens", "median ms", "min ms", "floor / measured", "peak GiB", "note"),
    ]
    for row in result.rows:
        note = f"FAILED: {row.error}" if row.error else row.note
        lines.append(
            f"| {row.name} | {row.tokens or '—'} | {_fmt(row.median_ms, '.2f')} | {_fmt(row.min_ms, '.2f')} | "
            f"{_fmt(row.floor_fraction, '.1%')} | {_fmt(row.peak_memory_gib, '.1f')} | {note.replace('|', '/')} |"
        )
    for tokens, flops in result.flops.items():
        lines.append(
            f"\nFLOP floor at {tokens} tokens: {flops['matmul_per_token'] / 1e9:.4g} GFLOP/token of matmuls x "
            f"{tokens} = {flops['matmul'] / 1e12:.4g} TFLOP + attention {flops['attention'] / 1e12:.4g} TFLOP = "
            f"{flops['step'] / 1e12:.4g} TFLOP per step, {flops['sample'] / 1e15:.4g} PFLOP per sample."
        )
    attention = result.attention or {}
    if attention.get("rows"):
        lines += ["", *table_head("attention alone", "N", "median ms", "TFLOP/s", "x SDPA no bias")]
        for row in attention["rows"]:
            if not row["variant"].startswith("triton "):  # every form; tile-sweep rows belong to bench attention
                lines.append(
                    f"| {row['variant']} | {row['tokens']} | {row['median_ms']:.3f} | {row['tflops']:.1f} | "
                    f"{row['vs_sdpa_no_bias']:.3f} |"
                )
    elif attention.get("error"):
        lines += ["", f"attention alone: FAILED: {attention['error']}"]
    return "\n".join(lines) + "\n"


def write_report(result: GpuBenchResult, out: Path) -> tuple[Path, Path]:
    """``bench_gpu.json`` and ``bench_gpu.md`` in ``out`` (each written to a temp name, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / "bench_gpu.json", out / "bench_gpu.md"
    atomic_write_text(json_path, json.dumps(result.to_dict(), indent=2) + "\n")
    atomic_write_text(markdown_path, format_markdown(result))
    return json_path, markdown_path
