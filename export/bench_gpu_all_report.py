"""The report of ``unidg bench gpu --all``: ``bench_gpu_all.json`` and ``bench_gpu_all.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path

from unidg.core.manifest import atomic_write_text
from unidg.core.markdown import table_head
from unidg.export.bench_gpu_all_plan import AllResult
from unidg.train.bench_train import TrainBenchResult, TrainRow
from unidg.train.bench_train import format_markdown as train_markdown

JSON_NAME, MARKDOWN_NAME = "bench_gpu_all.json", "bench_gpu_all.md"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or value != value else format(value, spec)


def format_markdown(result: AllResult) -> str:
    machine = result.machine
    gpu = machine.get("gpu", {})
    imports = machine.get("imports", {})
    title = f"### {gpu.get('name', 'CPU')}, {result.date}" + (" (dry run, not figures)" if result.dry_run else "")
    if not result.complete:
        title += " (incomplete: the run is going on or was stopped)"
    lines = [
        title,
        "",
        f"Command: `{result.command}`. {result.preset} preset (random weights), {result.dtype}, S = "
        f"{result.resolution}, {result.steps} steps, budget {result.budget_s:.0f} s, {result.elapsed_s:.0f} s used.",
        "",
        "Machine: "
        + ", ".join(
            f"{key} {machine.get(key)}" for key in ("torch", "cuda", "cudnn", "triton", "python") if key in machine
        )
        + (f"; GPU {gpu.get('name')} (sm {gpu.get('capability')}, {gpu.get('memory_gib')} GiB)" if gpu else "")
        + "; imports: "
        + ", ".join(
            f"{name} {imports.get(name) or 'no'}" for name in ("tensorrt", "onnxruntime", "diffusers", "torchao")
        )
        + f"; onnxruntime-gpu {'yes' if imports.get('onnxruntime_gpu') else 'no'}.",
    ]
    query = machine.get("nvidia_smi_query")
    if query:
        lines += ["", "nvidia-smi: `" + " / ".join(query.splitlines()) + "`"]
    if result.note:
        lines += ["", result.note]
    lines += [
        "",
        *table_head(
            "row", "status", "tokens", "median ms", "min ms", "× stock eager", "peak GiB", "configuration", "note"
        ),
    ]
    for row in result.rows:
        note = (f"FAILED: {row.error}" if row.error else row.note).replace("|", "/")
        ratio = "—" if row.speedup_vs_stock is None else f"{row.speedup_vs_stock:.2f}×"
        lines.append(
            f"| {row.name} | {row.status} | {row.tokens or '—'} | {_fmt(row.median_ms, '.2f')} | "
            f"{_fmt(row.min_ms, '.2f')} | {ratio} | {_fmt(row.peak_memory_gib, '.1f')} | "
            f"{row.configuration.replace('|', '/')} | {note} |"
        )
    if result.winners:
        lines += ["", "Chosen in this run: " + "; ".join(_winner_text(k, v) for k, v in result.winners.items()) + "."]
    for title_text, table in (("Attention alone", result.attention), ("Triton tile sweep", result.tile_sweep)):
        if not table:
            continue
        lines += [
            "",
            f"{title_text} (B = {table['batch']}, H = {table['heads']}, D = {table['head_dim']}, {table['dtype']}):",
            "",
            *table_head("form", "N", "median ms", "TFLOP/s", "× SDPA no bias", "max abs diff vs float mask", "note"),
        ]
        for r in table["rows"]:
            if title_text == "Triton tile sweep" and not r["variant"].startswith("triton m"):
                continue
            lines.append(
                f"| {r['variant']} | {r['tokens']} | {_fmt(r['median_ms'], '.3f')} | {_fmt(r['tflops'], '.0f')} | "
                f"{_fmt(r['vs_sdpa_no_bias'], '.2f')} | {_fmt(r['max_abs_diff_vs_mask'], '.1e')} | "
                f"{r['note'].replace('|', '/')} |"
            )
    if result.train:
        train = dict(result.train)
        train["rows"] = [TrainRow(**r) for r in train["rows"]]
        lines += ["", "Training (`unidg bench train`):", "", train_markdown(TrainBenchResult(**train)).strip()]
    return "\n".join(lines) + "\n"


def _winner_text(kind: str, value) -> str:
    if kind == "attention" and isinstance(value, dict):
        return (
            f"attention {value['form']} ({value['median_ms']:.3f} ms at {value['tokens']} tokens, "
            f"{value['vs_unbiased_sdpa']:.2f}x unbiased SDPA, {value['gpu']})"
        )
    return f"{kind.replace('_', ' ')}: {value}"


def write_all_report(result: AllResult, out: Path) -> tuple[Path, Path]:
    """``bench_gpu_all.json`` and ``bench_gpu_all.md`` in ``out``, each written to a temp name and renamed."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = out / JSON_NAME, out / MARKDOWN_NAME
    atomic_write_text(json_path, json.dumps(_without_nan(result.to_dict()), indent=2, allow_nan=False) + "\n")
    atomic_write_text(markdown_path, format_markdown(result))
    return json_path, markdown_path


def _without_nan(value):
    """JSON has no NaN: a figure that does not exist (a tile configuration that did not launch) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_nan(item) for item in value]
    return value
