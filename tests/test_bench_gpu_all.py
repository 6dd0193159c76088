"""``unidg bench gpu --all``: the budget logic, the machine record, the FP8 and key-range step paths against the plain
step, and one dry run of every row on the CPU. No GPU here: the dry run proves the harness, not performance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from unidg.core.errors import OptionError  # noqa: E402
from unidg.export.bench_gpu_all_plan import STOCK_STEP_ROW, AllResult, Budget, Plan  # noqa: E402
from unidg.export.bench_gpu_all_report import JSON_NAME, MARKDOWN_NAME, write_all_report  # noqa: E402
from unidg.export.bench_gpu_all_session import GpuSession, StepConfig  # noqa: E402
from unidg.export.machine_record import machine_record  # noqa: E402
from unidg.export.step_cache_fraction import read_static_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def empty_result() -> AllResult:
    return AllResult("2026-01-01", True, 10.0, "nano-dry-run", 32, 2, 1, "fp32")


def test_rows_past_the_budget_are_skipped_and_the_files_stay_valid_after_every_report(tmp_path):
    now = [0.0]
    result = empty_result()
    seen = []

    def report() -> None:
        write_all_report(result, tmp_path)
        seen.append(json.loads((tmp_path / JSON_NAME).read_text()))  # valid JSON at every point

    plan = Plan(result, Budget(10.0, clock=lambda: now[0]), report, dry_run=False)

    def spend(seconds: float):
        def measure(row) -> None:
            now[0] += seconds
            row.median_ms = 1.0

        return measure

    def broken(row) -> None:
        raise RuntimeError("no kernel image is available for execution on the device\nsecond line")

    plan.row("first", "step", 5, spend(6))
    plan.row("too big for what is left", "step", 5, spend(1))  # 4 s left, needs 5
    plan.row("broken", "step", 1, broken)
    plan.row("fits", "step", 3, spend(4))  # uses up the rest
    plan.row("after the end", "step", 0, spend(1))  # nothing left
    statuses = [(row.name, row.status) for row in result.rows]
    assert statuses == [
        ("first", "done"),
        ("too big for what is left", "skipped"),
        ("broken", "failed"),
        ("fits", "done"),
        ("after the end", "skipped"),
    ]
    assert result.rows[1].note == "budget: needs ~5 s, 4 s of 10 s left"
    assert result.rows[2].error == "RuntimeError: no kernel image is available for execution on the device"
    assert result.rows[0].seconds == 6.0 and result.rows[1].seconds is None
    assert seen[0]["rows"][0]["status"] == "running"  # written before the row runs: a killed run shows where
    markdown = (tmp_path / MARKDOWN_NAME).read_text()
    assert "(incomplete" in markdown and "| too big for what is left | skipped |" in markdown


def test_a_row_still_running_when_the_budget_ends_is_stopped():
    result = empty_result()
    plan = Plan(result, Budget(0.3), lambda: None, dry_run=True)
    started = time.monotonic()
    row = plan.row("sleeps", "step", 0, lambda row: time.sleep(5))
    assert time.monotonic() - started < 2.0
    assert row.status == "failed" and row.error.startswith("budget:")
    assert plan.row("next", "step", 0, lambda row: None).status == "skipped"


def test_machine_record_names_versions_and_optional_imports():
    record = machine_record(torch)
    assert record["torch"] == torch.__version__ and record["triton"]
    assert set(record["imports"]) >= {"tensorrt", "onnxruntime", "diffusers", "torchao", "onnxruntime_gpu"}
    assert record["imports"]["diffusers"] and record["imports"]["onnxruntime_gpu"] is False
    assert record["nvidia_smi"]  # the tool's output, or why it is not available


def test_step_caching_schedule_from_the_option_or_a_manifest(tmp_path):
    schedule, source = read_static_schedule(9, None, 28)
    assert source == "--cache-full-steps 9 of 28" and sum(schedule) == 9 and schedule[0]
    assert [i for i, full in enumerate(schedule) if full] == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    assert read_static_schedule(28, None, 28)[0] == (True,) * 28
    # The shipped nano bundle's gated schedule (unidg export cache-calibrate): 9 of 28 steps in full, as recorded.
    bundle = ROOT / "runtime" / "assets" / "unidg-nano-bundle"
    schedule, source = read_static_schedule(None, str(bundle), 28)
    recorded = json.loads((bundle / "manifest.json").read_text())["metadata"]["step_cache"]["gate"]["static"]
    assert list(schedule) == [bool(flag) for flag in recorded["schedule"]] and "9 of 28" in source
    with pytest.raises(OptionError, match="its schedule has 28 steps, the bench runs 10; pass --steps 28"):
        read_static_schedule(None, str(bundle), 10)
    (tmp_path / "manifest.json").write_text(json.dumps({"metadata": {"graphs": {}}}))
    with pytest.raises(OptionError, match="step_cache.gate.static.schedule"):
        read_static_schedule(None, str(tmp_path), 28)
    with pytest.raises(OptionError, match="1..28"):
        read_static_schedule(30, None, 28)


@pytest.fixture(scope="module")
def session():
    return GpuSession(torch, dry_run=True, resolution=32, steps=1, repeats=1, seed=0, backend="eager")


def step_output(session: GpuSession, config: StepConfig):
    session.use(config)
    work = session.inputs_for(config.attention)
    step = session.step_function(config)
    scalar = session._scalar
    with torch.inference_mode():
        out = step(
            work.x,
            work.cond,
            work.ctx,
            work.key_bias,
            scalar(0.8),
            scalar(0.75),
            scalar(1.0),
            work.img_ids,
            work.txt_ids,
        )
    if work.order is not None:  # the permuted request's tokens back in their order
        out = torch.empty_like(out).index_copy_(1, work.order, out)
    return out


def test_key_ranges_and_flex_steps_equal_the_float_mask_step(session):
    reference = step_output(session, StepConfig())
    for form in ("sdpa_key_ranges", "flex_score_mod", "sdpa_headdim_fold"):
        torch.testing.assert_close(step_output(session, StepConfig(attention=form)), reference, rtol=0, atol=2e-5)


def test_static_cache_loop_equals_the_euler_loop_when_every_step_is_full(session):
    """Row 10's loop: head + tail every step is the step; a schedule with cached steps runs them on the kept tail
    residual (finite, and not the full loop's result)."""
    session.use(StepConfig())
    work = session.inputs_for("sdpa_float_mask")
    sigmas = session.sigmas(4)
    args = (work.x, sigmas, work.cond, work.ctx, work.key_bias, session._scalar(1.0), work.img_ids, work.txt_ids)
    with torch.inference_mode():
        full = session.loop_function(StepConfig(), graph=False)(*args)
        every_step = session.cache_loop_function((True,) * 4, graph=False)(*args)
        cached = session.cache_loop_function((True, False, False, True), graph=True)(*args)
    torch.testing.assert_close(every_step, full, rtol=0, atol=2e-5)
    assert torch.isfinite(cached).all() and (cached - full).abs().max() > 1e-6


def test_the_lowered_step_equals_the_base_step(session):
    """The row timing what --backend torch runs computes the base row's step."""
    reference = step_output(session, StepConfig())
    work = session.inputs_for("sdpa_float_mask")
    scalar = session._scalar
    with torch.inference_mode():
        lowered = session.lowered_step()(
            work.x, work.cond, work.ctx, work.key_bias, scalar(0.8), scalar(0.75), scalar(1.0), work.img_ids,
            work.txt_ids,
        )  # fmt: skip
    torch.testing.assert_close(lowered, reference, rtol=0, atol=2e-5)


def test_fp8_fused_projections_stay_close_and_restore_exactly(session):
    reference = step_output(session, StepConfig())
    fp8 = step_output(session, StepConfig(fp8=True))
    assert session.fp8.quantized == 10  # double: QKV, added QKV, 2 outs, 4 MLP; single: QKV+MLP-in, proj_out
    blocks = session.model.transformer
    assert blocks.transformer_blocks[0].norm1.linear.weight.dtype == torch.float32  # modulation not quantized
    assert blocks.transformer_blocks[0].attn.to_q.weight.device.type == "cpu"  # high precision moved off
    delta = (fp8 - reference).abs().max() / reference.abs().max()
    assert 0 < delta < 0.05  # E4M3: a small, non-zero difference
    assert torch.equal(step_output(session, StepConfig()), reference)  # restore() puts every weight back


def test_dry_run_all_runs_every_row_and_records_the_machine(tmp_path):
    """One process (TRITON_INTERPRET=1 must precede triton's import); torch.compile with backend='eager'."""
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "unidg.cli", "bench", "gpu", "--all", "--dry-run", "--compile-backend", "eager"]
    command += ["--repeats", "1", "--steps", "1", "--cache-full-steps", "1", "--out", str(out)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "TRITON_INTERPRET": "1"}
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [JSON_NAME, MARKDOWN_NAME]  # nothing else written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]
    report = json.loads((out / JSON_NAME).read_text())
    assert report["complete"] and report["dry_run"] and report["machine"]["torch"] == torch.__version__
    rows = {row["name"]: row for row in report["rows"]}
    not_done = {name: row["error"] or row["note"] for name, row in rows.items() if row["status"] != "done"}
    assert not not_done
    for form in ("sdpa_key_ranges", "flex_score_mod", "triton_biased", "sdpa_headdim_fold"):
        assert f"base + attention {form}" in rows
    for name in (
        "stock diffusers step, eager",
        "stock diffusers step, torch.compile",
        "base + torch.compile",
        "project step, lowered (the torch backend's program form), eager",
        "base + CUDA graph (loop)",
        "base + FP8 (fused QKV, bf16 modulation), eager",
        "compile + attention winner + FP8",
        "end to end per sample, fastest combination",
        "stock diffusers end to end per sample, eager",
        "end to end with static step caching",
        "attention: Triton tile sweep",
        "bench train: SFT step, full-width slice",
        "ONNX bundle step on onnxruntime (CUDA EP)",
    ):
        assert rows[name]["median_ms"] > 0, name
    assert rows["stock diffusers step, eager"]["tokens"] == 32 and rows["base + torch.compile"]["tokens"] == 25
    assert rows["stock diffusers step, eager"]["speedup_vs_stock"] == 1.0
    assert rows["base + torch.compile"]["speedup_vs_stock"] > 0
    assert rows["end to end per sample, fastest combination"]["speedup_vs_stock"] > 0
    caching = rows["end to end with static step caching"]
    assert "measured: 1 of 1 steps run the transformer in full" in caching["note"]
    assert "static step cache (--cache-full-steps 1 of 1)" in caching["configuration"]
    assert report["winners"]["attention"]["form"] and report["winners"]["end_to_end"]
    forms = {r["variant"] for r in report["attention"]["rows"]}
    assert {"sdpa_key_ranges", "flex_score_mod", "triton_biased", "sdpa_float_mask"} <= forms
    assert any(r["variant"].startswith("triton m") for r in report["tile_sweep"]["rows"])
    assert [r["device"] for r in report["train"]["rows"]] == ["cpu", "cpu"]
    markdown = (out / MARKDOWN_NAME).read_text()
    assert "dry run, not figures" in markdown and "× stock eager" in markdown and "incomplete" not in markdown


def test_a_spent_budget_skips_rows_and_leaves_valid_files(tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "unidg.cli", "bench", "gpu", "--all", "--dry-run", "--budget-s", "0.05"]
    command += ["--out", str(out)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / JSON_NAME).read_text())
    assert report["machine"]["imports"]["diffusers"]
    statuses = {row["status"] for row in report["rows"]}
    assert statuses <= {"skipped", "failed"} and "skipped" in statuses
    assert all(
        row["note"].startswith("budget") or row["error"].startswith("budget") or "no schedule" in row["note"]
        for row in report["rows"]
    )
    assert "| skipped |" in (out / MARKDOWN_NAME).read_text()


def test_stock_rows_refuse_fp8(session):
    with pytest.raises(ValueError, match="stock"):
        session.use(replace(StepConfig(attention="stock"), fp8=True))


def test_fp8_failing_half_way_puts_every_weight_back(session, monkeypatch):
    reference = step_output(session, StepConfig())

    def out_of_memory(block):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(session.fp8, "_fuse_single", out_of_memory)  # after every double block was swapped
    with pytest.raises(RuntimeError, match="out of memory"):
        session.use(StepConfig(fp8=True))
    assert not session.fp8.active and not hasattr(session.model.transformer.transformer_blocks[0].attn, "to_qkv")
    session.current = None
    assert torch.equal(step_output(session, StepConfig()), reference)


def test_only_runs_the_selected_rows_and_always_the_stock_reference():
    result = empty_result()
    plan = Plan(result, Budget(100.0), lambda: None, dry_run=True, only=("Tile Sweep",))
    for name in (STOCK_STEP_ROW, "base + torch.compile", "attention: Triton tile sweep"):
        plan.row(name, "step", 0, lambda row: setattr(row, "median_ms", 1.0))
    assert [row.status for row in result.rows] == ["done", "skipped", "done"]
    assert result.rows[1].note == "not selected (--only)"
