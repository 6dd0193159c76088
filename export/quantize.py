"""``unidg export quantize``: an FP8 or INT8 bundle with NVIDIA ModelOpt, gated by an accuracy report.

1. Calibration of the transformer with ModelOpt on the step inputs of a calibration set built from the same weights
   (``unidg calib build``; its held-out samples are kept for the report): ``unidg.export.quantize_modelopt``.
2. Export of the Q/DQ step graph and the fix-ups that make its Q/DQ standard ONNX: ``unidg.export.qdq``.
   Everything the quantized Linears do not cover keeps the *high precision*: bf16 by default for FP8 (NVIDIA's
   diffusers recipe: the model is cast to bf16 before calibration and export, so norms, RoPE, attention, biases and
   the VAE are bf16 in the bundle), fp32 for INT8 and for FP8 bundles that must run on onnxruntime's CPU provider
   (``--high-precision fp32``).
3. Accuracy report on the held-out samples against the unquantized bundle of the same high precision, both in
   onnxruntime (bf16 graphs as their float32 emulation, ``unidg.export.bf16_emulation``):
   ``unidg.export.quantize_accuracy``. The gate (``--min-cosine``, ``--min-psnr``) fails the command and writes
   nothing.
4. The bundle: the quantized step graph beside the reference bundle's other graphs, with the quantization and the
   report in its manifest.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import onnx

from unidg.calib.build import read_calib
from unidg.core.manifest import read_manifest, tool_versions
from unidg.core.weights_folder import check_output, read_weights, staged_folder
from unidg.export.bundle import TOOLS, export_bundle, write_bundle_manifest
from unidg.export.onnx_export import Progress, cast_for_precision, io_table, print_progress
from unidg.export.qdq import FUSED_ATTENTION_FORMATS, QDQ_OPSET, export_qdq_step, finish_qdq_graph, precision_census
from unidg.export.quantize_accuracy import (
    DEFAULT_MIN_COSINE,
    DEFAULT_MIN_PSNR,
    AccuracyGateError,
    AccuracyReport,
    accuracy_report,
    tile_batch,
)
from unidg.export.quantize_modelopt import (
    FORMATS,
    HIGH_PRECISION_MODULES,
    SMOOTHQUANT_ALPHA,
    QuantizationError,
    calibrate,
    guard_amax,
    quant_config,
    scale_amax,
)
from unidg.runtime.bundle import GRAPH_NAMES, Bundle, load_bundle
from unidg.train.loading import load_weights_model

__all__ = [
    "DEFAULT_MIN_COSINE",
    "DEFAULT_MIN_PSNR",
    "FORMATS",
    "HIGH_PRECISIONS",
    "HIGH_PRECISION_MODULES",
    "AccuracyGateError",
    "AccuracyReport",
    "QuantizationError",
    "precision_census",
    "quant_config",
    "quantize_bundle",
]


HIGH_PRECISIONS = ("bf16", "fp32")


def default_high_precision(fmt: str) -> str:
    """bf16 for FP8 (the TensorRT recipe); fp32 for INT8, whose opset-20 Q/DQ graph onnxruntime's CPU must run."""
    return "bf16" if fmt == "fp8" else "fp32"


def _reference_bundle(reference: str | Path, weights_fingerprint: str, resolution: int, precision: str) -> Bundle:
    bundle = load_bundle(reference)
    if bundle.metadata.get("weights", {}).get("fingerprint") != weights_fingerprint:
        raise QuantizationError(
            f"--reference {reference} was exported from other weights; export it from --weights with "
            "`unidg export onnx`, or leave --reference out"
        )
    if bundle.precision in FORMATS:
        raise QuantizationError(f"--reference {reference} is itself {bundle.precision}; it must be unquantized")
    if bundle.precision != precision:
        raise QuantizationError(
            f"--reference {reference} is {bundle.precision} but the high precision is {precision}; export it with "
            f"`unidg export onnx --precision {precision}`, or leave --reference out"
        )
    if bundle.resolution != resolution:
        raise QuantizationError(
            f"--reference {reference} is a static S={bundle.resolution} bundle but the calibration set is at "
            f"S={resolution}; export the reference at --resolution {resolution}"
        )
    return bundle


def _check_precision(fmt: str, high_precision: str | None) -> str:
    """The high precision for ``fmt`` (its default when not given), refused where the pair cannot be built."""
    if fmt not in FORMATS:
        raise QuantizationError(f"--format {fmt!r}: choose one of {list(FORMATS)}")
    high_precision = high_precision or default_high_precision(fmt)
    if high_precision not in HIGH_PRECISIONS:
        raise QuantizationError(f"--high-precision {high_precision!r}: choose one of {list(HIGH_PRECISIONS)}")
    if fmt == "int8" and high_precision != "fp32":
        raise QuantizationError(
            "--format int8 keeps fp32 as its high precision (its Q/DQ graph is checked on onnxruntime's CPU "
            "provider); pass --high-precision fp32 or leave it out"
        )
    return high_precision


def _export_reference(
    weights: str | Path, workdir: Path, high_precision: str, resolution: int, progress: Progress | None
) -> Path:
    """The unquantized bundle of the same weights, exported into ``workdir`` when no --reference is given."""
    if progress:
        progress(f"exporting the unquantized {high_precision} reference graphs at S={resolution}")
    reference_dir = workdir / "reference"
    export_bundle(
        weights,
        reference_dir,
        precision=high_precision,
        resolution=resolution,
        verify_weights=False,
        progress=progress,
    )
    return reference_dir


def _quantized_step(
    model,
    calib_set,
    fmt: str,
    reference_bundle: Bundle,
    step_path: Path,
    *,
    alpha: float,
    calib_limit: int | None,
    amax_scale: float,
    progress: Progress | None,
) -> tuple[dict, dict[str, int]]:
    """Calibrate the transformer and export its Q/DQ step graph to ``step_path``: the calibration summary and the
    graph's op counts."""
    summary = calibrate(model, calib_set, fmt, alpha=alpha, limit=calib_limit, progress=progress)
    if amax_scale != 1.0:
        scale_amax(model.transformer, amax_scale)
        summary["amax_scale"] = amax_scale
    summary["amax_replaced"] = guard_amax(model.transformer)
    example = next(calib_set.records(held_out=False))
    batch = reference_bundle.batch or 1
    example = tile_batch(example, batch)
    if progress:
        progress(f"exporting the {fmt} Q/DQ step graph (TorchScript exporter, opset {QDQ_OPSET})")
    fused = fmt in FUSED_ATTENTION_FORMATS
    export_qdq_step(model, step_path, example, dynamic_batch=reference_bundle.batch is None, fused_attention=fused)
    return summary, finish_qdq_graph(step_path, fmt, progress)


def _quantization_entry(
    fmt: str,
    high_precision: str,
    alpha: float,
    calib_set,
    summary: dict,
    reference_bundle: Bundle,
    report: AccuracyReport,
) -> dict:
    """The manifest's ``quantization`` table: how the step graph was quantized, on what, and how accurate it is
    (the seconds it took are added when the bundle is written)."""
    fused = fmt in FUSED_ATTENTION_FORMATS
    return {
        "tool": "nvidia-modelopt",
        "format": fmt,
        "high_precision": high_precision,
        "algorithm": "max" if fmt == "fp8" else {"method": "smoothquant", "alpha": alpha},
        "high_precision_modules": list(HIGH_PRECISION_MODULES),
        "attention": "not quantized" + (" (fused Attention node)" if fused else ""),
        "calib": {
            "path": calib_set.path.name,
            "fingerprint": calib_set.manifest.fingerprint,
            "records": summary,
        },
        "reference_fingerprint": reference_bundle.fingerprint,
        "accuracy": report.to_dict(),
    }


def _write_quantized_bundle(
    staging: Path,
    reference_bundle: Bundle,
    step_path: Path,
    op_counts: dict[str, int],
    report_data: dict,
    settings,
    fmt: str,
    quantization: dict,
    started: float,
) -> None:
    """The quantized step graph beside the reference bundle's other graphs, the report and the manifest; ``started``:
    when the command began (``time.perf_counter``), for the seconds the manifest records."""
    records = _copy_reference_graphs(reference_bundle, staging)
    step_model = onnx.load(str(step_path), load_external_data=False)
    for file in step_path.parent.glob("step.onnx*"):
        shutil.copy2(file, staging / file.name)
    records["step"] = {
        "file": "step.onnx",
        "inputs": io_table(step_model.graph.input),
        "outputs": io_table(step_model.graph.output),
        "external_data": ["step.onnx.data"] if (staging / "step.onnx.data").exists() else [],
        "op_counts": op_counts,
    }
    (staging / "accuracy.json").write_text(json.dumps(report_data, indent=2) + "\n")
    metadata = copy.deepcopy(reference_bundle.metadata)
    metadata.update(
        {
            "settings": settings.to_dict(),
            "precision": fmt,
            "attention": "portable",
            "attention_form": "expand" if fmt in FUSED_ATTENTION_FORMATS else "decomposed",
            "opset": max(o.version for o in step_model.opset_import if o.domain in ("", "ai.onnx")),
            "graphs": {name: records[name] for name in GRAPH_NAMES},
            "engines": {},
            "quantization": {**quantization, "seconds": round(time.perf_counter() - started, 1)},
            "tools": tool_versions(*TOOLS),
        }
    )
    write_bundle_manifest(staging, metadata)


def quantize_bundle(
    weights: str | Path,
    calib: str | Path,
    fmt: str,
    out: str | Path,
    *,
    reference: str | Path | None = None,
    alpha: float = SMOOTHQUANT_ALPHA,
    min_cosine: float = DEFAULT_MIN_COSINE,
    min_psnr: float = DEFAULT_MIN_PSNR,
    calib_limit: int | None = None,
    report_samples: int | None = None,
    amax_scale: float = 1.0,
    high_precision: str | None = None,
    overwrite: bool = False,
    progress: Progress | None = print_progress,
) -> dict:
    """``unidg export quantize``: returns the accuracy report (dict); raises AccuracyGateError below the gate."""
    high_precision = _check_precision(fmt, high_precision)
    check_output(out, overwrite=overwrite)
    info = read_weights(weights, progress=progress)
    calib_set = read_calib(calib, weights_fingerprint=info.fingerprint)
    resolution = calib_set.resolution
    settings = replace(info.settings, resolution=resolution)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix=".unidg-quantize.", dir=Path(out).absolute().parent))
    try:
        if reference is None:
            reference = _export_reference(weights, workdir, high_precision, resolution, progress)
        reference_bundle = _reference_bundle(reference, info.fingerprint, resolution, high_precision)

        model = cast_for_precision(load_weights_model(info, settings), high_precision)
        step_path = workdir / "step.onnx"
        summary, op_counts = _quantized_step(
            model,
            calib_set,
            fmt,
            reference_bundle,
            step_path,
            alpha=alpha,
            calib_limit=calib_limit,
            amax_scale=amax_scale,
            progress=progress,
        )

        if progress:
            progress("measuring accuracy on the held-out samples against the unquantized bundle")
        report = accuracy_report(
            step_path,
            reference_bundle,
            calib_set,
            fmt,
            min_cosine=min_cosine,
            min_psnr=min_psnr,
            samples=report_samples,
            high_precision=high_precision,
        )
        if progress:
            progress(str(report))
        report_data = {**report.to_dict(), "calibration": summary}
        if not report.passed:
            raise AccuracyGateError(
                f"the {fmt} bundle fails the accuracy gate, nothing was written to {out}: {report}. Rebuild the "
                "calibration set (more samples, the right weights) or lower --min-cosine/--min-psnr deliberately",
                report_data,
            )
        with staged_folder(out, overwrite=overwrite) as staging:
            quantization = _quantization_entry(fmt, high_precision, alpha, calib_set, summary, reference_bundle, report)
            _write_quantized_bundle(
                staging, reference_bundle, step_path, op_counts, report_data, settings, fmt, quantization, started
            )
        if progress:
            progress(f"{fmt} bundle written to {out}")
        return report_data
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _copy_reference_graphs(reference: Bundle, staging: Path) -> dict[str, dict]:
    """The VAE and image-encoder graphs of the reference bundle, copied unchanged (with their manifest entries)."""
    manifest = read_manifest(reference.path, kind="bundle")
    graphs = manifest.metadata["graphs"]
    copied = {}
    for name in GRAPH_NAMES:
        if name == "step":
            continue
        entry = graphs[name]
        for file in [entry["file"], *entry.get("external_data", [])]:
            shutil.copy2(reference.path / file, staging / file)
        copied[name] = entry
    return copied
