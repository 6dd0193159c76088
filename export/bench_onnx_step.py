"""The ONNX row of ``unidg bench gpu --all``: the shipped bundle's step graph on onnxruntime."""

from __future__ import annotations

import statistics
import time

import numpy as np
import onnxruntime as ort

from unidg.core.latents import COND_CHANNELS, PACKED_CHANNELS, text_ids
from unidg.export.bench_gpu_all_plan import PlanRow, RowSkipped
from unidg.runtime.backends.base import StepConditioning
from unidg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from unidg.runtime.bundle import load_bundle
from unidg.runtime.demo import DEFAULT_BUNDLE


def onnx_bundle_step(row: PlanRow, dry_run: bool, repeats: int) -> None:
    """The shipped UniDG-nano bundle's step graph on onnxruntime's CUDA execution provider (where onnxruntime-gpu is
    installed; the dry run uses the CPU provider to check the path). The nano model only: no full-size ONNX bundle
    travels to a GPU machine."""
    providers = ort.get_available_providers()
    if not dry_run and "CUDAExecutionProvider" not in providers:
        raise RowSkipped(f"onnxruntime-gpu not installed (providers: {', '.join(providers)})")
    provider = "cpu" if dry_run else "cuda"
    bundle = load_bundle(DEFAULT_BUNDLE)
    backend = OnnxRuntimeBackend.from_bundle(bundle, providers=(provider,))
    rng = np.random.default_rng(0)
    tokens, context = bundle.image_tokens, bundle.context_tokens
    conditioning = StepConditioning(
        cond=rng.standard_normal((1, tokens, COND_CHANNELS)).astype(np.float32),
        ctx=rng.standard_normal((1, context, bundle.joint_dim)).astype(np.float32),
        key_bias=np.zeros((1, context + tokens), dtype=np.float32),
        guidance=np.ones(1, dtype=np.float32),
        img_ids=bundle.layout.image_ids(),
        txt_ids=text_ids(context).astype(np.float32),
    )
    x = rng.standard_normal((1, tokens, PACKED_CHANNELS)).astype(np.float32)
    backend.step(x, conditioning, 0.8, 0.75)
    times = []
    for _ in range(1 if dry_run else repeats):
        started = time.perf_counter()
        backend.step(x, conditioning, 0.8, 0.75)
        times.append((time.perf_counter() - started) * 1e3)
    backend.close()
    row.tokens = context + tokens
    row.median_ms, row.min_ms = statistics.median(times), min(times)
    row.configuration = f"UniDG-nano bundle, {provider} execution provider"
    row.note = "the shipped nano bundle (no full-size ONNX bundle travels); host copies included"
