"""``unidg bench gpu``: the FLOP count, the peak table, and a dry run of every path on the CPU at a tiny size.

No GPU here: the dry run proves the harness (every row measured without error, FP8 emulated, the Triton kernel
interpreted, the CUDA-graph wrapper uncaptured); it produces no performance figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from unidg.export.bench_gpu_report import GpuBenchResult, Row, format_markdown  # noqa: E402
from unidg.export.bench_gpu_rows import _floor_fraction, _reporting, run_gpu_bench  # noqa: E402
from unidg.export.flop_floor import attention_flops_per_step, gpu_peaks, matmul_flops_per_token  # noqa: E402


def test_flop_floor_is_the_design_count():
    per_token = matmul_flops_per_token(19, 38, 3072)
    assert round(per_token / 1e9, 1) == 12.9
    step = {n: per_token * n + attention_flops_per_step(57, n, 3072) for n in (5849, 5338)}
    # DESIGN §8 counts with 12.9 rounded: 99.4 and 88.8 TFLOP per step; unrounded (12.906 GFLOP/token) 99.47, 88.85
    assert step[5849] == pytest.approx(99.4e12, rel=1e-3)
    assert step[5338] == pytest.approx(88.8e12, rel=1e-3)
    assert 28 * step[5849] == pytest.approx(2.78e15, rel=2e-3)


def test_gpu_peaks_by_name():
    assert gpu_peaks("NVIDIA H100 80GB HBM3") == (989.4, 1978.9)
    assert gpu_peaks("NVIDIA H100 PCIe") == (756.0, 1513.0)
    assert gpu_peaks("NVIDIA H200") == (989.4, 1978.9)
    assert gpu_peaks("NVIDIA H20") == (148.0, 296.0)
    assert gpu_peaks("NVIDIA A100-SXM4-80GB") == (312.0, None)
    assert gpu_peaks("Some Other Accelerator") is None


def test_floor_fraction_counts_fp8_matmuls_at_the_fp8_peak():
    result = GpuBenchResult("cuda", "NVIDIA H100", "d", False, "full", 768, 28, 1)
    result.peaks_tflops = {"bf16": 1000.0, "fp8": 2000.0}
    result.flops = {"10": {"matmul_per_token": 2e11, "matmul": 2e12, "attention": 1e12, "step": 3e12, "sample": 9e13}}
    row = Row("x", tokens=10, median_ms=10.0)
    assert _floor_fraction(result, row, fp8=False) == pytest.approx(0.3)  # 3 ms floor / 10 ms
    assert _floor_fraction(result, row, fp8=True) == pytest.approx(0.2)  # 1 + 1 ms
    assert "| x | 10 | 10.00 |" in format_markdown(replace_rows(result, [row]))


def replace_rows(result: GpuBenchResult, rows: list[Row]) -> GpuBenchResult:
    result.rows = rows
    return result


def test_a_failed_row_is_recorded_and_the_partial_report_says_so():
    result = GpuBenchResult("cuda", "NVIDIA H100", "d", False, "full", 768, 28, 1)
    reports = []
    attempt = _reporting(result.rows, lambda: reports.append(format_markdown(result)))

    def broken(row: Row) -> None:
        raise RuntimeError("no kernel image is available\nsecond line")

    def works(row: Row) -> None:
        row.median_ms = 5.0

    attempt(Row("broken"), broken)
    attempt(Row("skipped", note="--no-compile"), None)
    attempt(Row("works"), works)
    assert [row.error for row in result.rows] == ["RuntimeError: no kernel image is available", "", ""]
    assert result.rows[2].median_ms == 5.0 and result.rows[1].median_ms is None
    assert len(reports) == 3 and all("incomplete" in report for report in reports)
    assert "| broken | — | — |" in reports[-1] and "FAILED: RuntimeError" in reports[-1]


def test_without_a_gpu_the_bench_says_how_to_dry_run():
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ValueError, match="--dry-run"):
        run_gpu_bench()


def test_dry_run_measures_every_path(tmp_path):
    """A fresh process: Triton's interpreter needs TRITON_INTERPRET=1 before triton's first import. torch.compile
    runs with backend='eager' here (dynamo traces every block; inductor code generation is covered by
    tests/test_runtime_torch_backend.py::test_compiled_step_equals_eager)."""
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "unidg.cli", "bench", "gpu", "--dry-run", "--compile-backend", "eager"]
    command += ["--repeats", "1", "--steps", "1", "--out", str(out)]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((out / "bench_gpu.json").read_text())
    markdown = (out / "bench_gpu.md").read_text()
    assert report["dry_run"] and report["device"] == "cpu" and "not performance figures" in report["note"]
    assert report["complete"] and "incomplete" not in markdown
    names = [row["name"] for row in report["rows"]]
    assert names == [
        "eager, SDPA, unfolded",
        "eager, SDPA",
        "+ torch.compile",
        "+ fused biased attention",
        "+ FP8 matmuls",
        "+ 1-step loop as a CUDA graph",
        "VAE encode 32x64",
        "VAE decode 32x64",
        "image encoder (SigLIP + Redux)",
        "end to end per sample",
    ]
    for row in report["rows"]:
        assert not row["error"], row
        assert row["median_ms"] > 0
    notes = {row["name"]: row["note"] for row in report["rows"]}
    assert "Triton biased attention in 2 blocks" == notes["+ fused biased attention"]
    assert "emulated in float32" in notes["+ FP8 matmuls"]
    assert "CPU: not captured" in notes["+ 1-step loop as a CUDA graph"]
    assert report["tokens"] == {"image": 8, "context_folded": 17, "context": 24, "folded": 25, "unfolded": 32}
    assert {row["variant"] for row in report["attention"]["rows"]} >= {"triton_biased", "sdpa_no_bias"}
    assert "dry run, not figures" in markdown and "| + FP8 matmuls | 25 |" in markdown
