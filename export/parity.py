"""Parity of a bundle with the torch model it was exported from.

Per graph: the four graphs run in onnxruntime (through polygraphy's runner) on the same inputs as the torch modules;
the inputs and the torch outputs are saved as polygraphy JSON so the comparison can be re-run from the shell:

    polygraphy run BUNDLE/step.onnx --onnxrt --load-inputs P/step_inputs.json --load-outputs P/step_torch.json \\
        --atol 1e-4 --rtol 1e-3

Trajectory: the whole 28-step synthesis of one request, torch reference sampler (unidg.train.sampler) against the
runtime's DefectSynthesizer on the bundle with the onnxruntime backend (same host code as production): the final
latents of the step graph alone (torch conditioning, 28 ONNX steps) and the decoded diptych / pasted image (PSNR).

Figures: ``max_abs`` = max |onnx - torch|; ``max_rel`` = max_abs / max |torch| (relative to the tensor's range; an
elementwise ratio explodes where torch is ~0); PSNR on uint8 images (peak 255).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from unidg.core.errors import UniDGError
from unidg.core.geometry import paste_back, right_half
from unidg.export.bf16_emulation import emulated_bf16_file
from unidg.export.onnx_export import ModelFacts, cast_for_precision, graph_example_inputs, graph_module
from unidg.runtime.backends.base import StepConditioning
from unidg.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from unidg.runtime.bundle import GRAPH_NAMES, GRAPH_OUTPUTS, Bundle, load_bundle
from unidg.runtime.sampler import sampling_sigmas
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest
from unidg.train.model import pack_latents
from unidg.train.sampler import decode, denoise, get_noise, prepare_diptych

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-3
# polygraphy tolerances per bundle precision (fp16 graphs are compared with the float32 torch model)
TOLERANCES = {"fp32": (DEFAULT_ATOL, DEFAULT_RTOL), "fp16": (2e-2, 2e-2)}
# bf16 graphs run emulated (float32 with bf16 rounding) against the torch model in bf16; measured on UniDG-nano at
# S = 128: step 1.4e-3, VAE encoder 3.1e-2, decoder 3.9e-2, image encoder 1.6e-2 max abs.
BF16_EMULATION_MAX_ABS = {"step": 1e-2, "vae_encoder": 8e-2, "vae_decoder": 8e-2, "image_encoder": 4e-2}


class ParityError(UniDGError):
    """Parity cannot be measured as asked (bundle and model disagree, inputs of the wrong shape)."""


@dataclass(frozen=True)
class Figures:
    max_abs: float
    max_rel: float
    mean_abs: float
    reference_max: float

    def to_dict(self) -> dict:
        return {k: float(v) for k, v in asdict(self).items()}

    def __str__(self) -> str:
        return f"max abs {self.max_abs:.3g}, max rel {self.max_rel:.3g} (mean abs {self.mean_abs:.3g})"


def compare(actual: np.ndarray, expected: np.ndarray) -> Figures:
    if actual.shape != expected.shape:
        raise ParityError(f"output shapes differ: onnx {actual.shape} vs torch {expected.shape}")
    diff = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    return Figures(
        max_abs=max_abs,
        max_rel=max_abs / max(scale, 1e-12),
        mean_abs=float(diff.mean()) if diff.size else 0.0,
        reference_max=scale,
    )


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """PSNR in dB of two uint8 images (inf when identical)."""
    if a.shape != b.shape:
        raise ParityError(f"image shapes differ: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def json_figures(data: dict) -> dict:
    """``data`` for a JSON report: an infinite figure (the PSNR of identical images) becomes null."""
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in data.items()}


def gate_figures(report, **extra) -> dict:
    """A gated report (a dataclass with a ``passed`` property) for a JSON report: its fields, ``passed``, then
    ``extra`` (a field named there is replaced in place)."""
    return json_figures({**asdict(report), "passed": report.passed, **extra})


def verdict(passed: bool) -> str:
    """The word a gated report's line ends with."""
    return "PASS" if passed else "FAIL"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denominator = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / denominator if denominator > 0 else (1.0 if not a.any() and not b.any() else 0.0)


def onnx_session(path: str | Path, precision: str = "fp32", threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; FP8 Q/DQ graphs need onnxruntime's QDQ propagation off (it rewrites them into unsupported ops)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    extra = {"disabled_optimizers": ["QDQPropagationTransformer"]} if precision == "fp8" else {}
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"], **extra)


def bundle_facts(bundle: Bundle) -> ModelFacts:
    meta = bundle.metadata
    return ModelFacts(
        resolution=bundle.resolution,
        text_tokens=bundle.text_tokens,
        fold_text_tokens=bundle.fold_text_tokens,
        reference_tokens=bundle.reference_tokens,
        context_tokens=bundle.context_tokens,
        joint_dim=bundle.joint_dim,
        reference_size=bundle.reference_size,
        guidance_embeds=bool(meta.get("guidance_embeds", True)),
    )


def check_model_matches(bundle: Bundle, model) -> None:
    facts = ModelFacts.of(model, bundle.resolution)
    ours = bundle_facts(bundle)
    fields = ("reference_tokens", "context_tokens", "joint_dim", "reference_size", "text_tokens", "fold_text_tokens")
    diffs = [
        f"{f}: bundle {getattr(ours, f)} vs model {getattr(facts, f)}"
        for f in fields
        if getattr(ours, f) != getattr(facts, f)
    ]
    if diffs:
        raise ParityError(f"bundle {bundle.path} was not exported from this model ({'; '.join(diffs)})")


def torch_outputs(model, graph: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The torch module's output for a bundle graph's inputs (the model as trained: its own attention, RoPE)."""
    with torch.no_grad():
        return graph_module(graph, model)(*[torch.from_numpy(a) for a in inputs.values()]).float().numpy()


@dataclass(frozen=True)
class GraphParity:
    graph: str
    figures: Figures
    # None: not compared with polygraphy (FP8 graphs need a tuned session); bf16: the emulation's max-abs bound
    polygraphy_passed: bool | None
    command: str | None  # the polygraphy CLI command reproducing the comparison

    def to_dict(self) -> dict:
        return {
            "graph": self.graph,
            **self.figures.to_dict(),
            "polygraphy_passed": self.polygraphy_passed,
            "command": self.command,
        }


def _polygraphy_compare(
    path: Path, inputs: dict, expected: np.ndarray, output: str, atol: float, rtol: float, save: Path | None
) -> tuple[np.ndarray, bool, str | None]:
    """Run ``path`` with polygraphy's onnxruntime runner and compare with the torch output (saved as JSON)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING  # the figures are reported by the caller
    runner = OnnxrtRunner(SessionFromOnnx(str(path), providers=["cpu"]), name="onnxrt")
    results = Comparator.run([runner], data_loader=[inputs])
    torch_results = RunResults([("torch", [IterationResult({output: expected}, runner_name="torch")])])
    combined = RunResults(list(results.items()) + list(torch_results.items()))
    accuracy = Comparator.compare_accuracy(combined, compare_func=SimpleCompareFunc(atol=atol, rtol=rtol))
    actual = results["onnxrt"][0][output]
    command = None
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        name = path.stem
        save_json([inputs], save / f"{name}_inputs.json")
        torch_results.save(str(save / f"{name}_torch.json"))
        command = (
            f"polygraphy run {path} --onnxrt --load-inputs {save / f'{name}_inputs.json'} "
            f"--load-outputs {save / f'{name}_torch.json'} --atol {atol:g} --rtol {rtol:g}"
        )
    return np.asarray(actual), bool(accuracy), command


def graph_parity(
    bundle_path: str | Path,
    model,
    *,
    graphs: tuple[str, ...] = GRAPH_NAMES,
    batch: int | None = None,
    seed: int = 0,
    save_dir: str | Path | None = None,
    atol: float | None = None,
    rtol: float | None = None,
) -> dict[str, GraphParity]:
    """Per-graph parity of a bundle with ``model`` on example inputs (seeded); tolerances default per precision."""
    bundle = load_bundle(bundle_path)
    check_model_matches(bundle, model)
    emulated = bundle.precision == "bf16"
    if emulated:
        # onnxruntime's CPU provider has no bf16 kernels: the graphs run as their float32 emulation
        # (export/bf16_emulation.py) against the torch model in bf16, the computation the graphs were exported from.
        import copy
        import tempfile

        model = cast_for_precision(copy.deepcopy(model), "bf16")
        scratch = Path(tempfile.mkdtemp(prefix=".unidg-bf16-emulation."))
    default_atol, default_rtol = TOLERANCES.get(bundle.precision, TOLERANCES["fp32"])
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    facts = bundle_facts(bundle)
    if batch is not None and bundle.batch is not None and batch != bundle.batch:
        raise ParityError(
            f"bundle {bundle.path.name} is static with batch {bundle.batch}; it cannot run batch {batch} "
            "(export it with --batch dynamic)"
        )
    batch = batch or bundle.batch or 2
    save = Path(save_dir) if save_dir is not None else None
    results = {}
    for graph in graphs:
        inputs = graph_example_inputs(graph, facts, batch, seed)
        expected = torch_outputs(model, graph, inputs)
        output = GRAPH_OUTPUTS[graph][0]
        path = bundle.graph_path(graph)
        if emulated:
            emulated_bf16_file(path, scratch / path.name)
            path = scratch / path.name
        if emulated or bundle.precision == "fp8" or bundle.metadata.get("attention") == "plugin":
            session = onnx_session(path, bundle.precision)
            actual, passed, command = session.run([output], inputs)[0], None, None
            if emulated:
                passed = compare(actual, expected).max_abs <= BF16_EMULATION_MAX_ABS[graph]
        else:
            actual, passed, command = _polygraphy_compare(path, inputs, expected, output, atol, rtol, save)
        results[graph] = GraphParity(graph, compare(actual, expected), passed, command)
    if emulated:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return results


# ------------------------------------------------------------------------------------------------ trajectory
def synthetic_request(size: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A deterministic (reference, reference mask, source, target mask): smooth textures with an elliptic dark
    defect on the reference and an elliptic target region on the source."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size

    def texture(phase: float) -> np.ndarray:
        base = np.stack([np.sin(6 * xx + phase + c) * np.cos(5 * yy - c) for c in range(3)], axis=-1)
        grain = rng.normal(0, 0.15, (size, size, 3))
        return np.clip(127 + 80 * base + 40 * grain, 0, 255).astype(np.uint8)

    def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1

    reference = texture(0.3)
    reference_mask = ellipse(0.45, 0.55, 0.12, 0.2)
    reference[reference_mask] = (reference[reference_mask] * 0.35).astype(np.uint8)
    source = texture(1.7)
    target_mask = ellipse(0.6, 0.4, 0.15, 0.1)
    return reference, reference_mask, source, target_mask


@dataclass(frozen=True)
class TrajectoryParity:
    steps: int
    latents: Figures  # step graph alone: 28 ONNX steps from the torch conditioning vs the torch sampler
    diptych_psnr: float  # full pipeline (all four graphs, runtime host code) vs torch, decoded S x 2S diptych
    image_psnr: float  # after paste-back into the source
    latents_pipeline: Figures  # final latents of the full ONNX pipeline vs torch

    def to_dict(self) -> dict:
        return {
            "steps": self.steps,
            "latents": self.latents.to_dict(),
            "latents_pipeline": self.latents_pipeline.to_dict(),
            "diptych_psnr": self.diptych_psnr,
            "image_psnr": self.image_psnr,
        }


def trajectory_parity(
    bundle_path: str | Path,
    model,
    *,
    seed: int = 0,
    steps: int | None = None,
    request: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> TrajectoryParity:
    """The whole synthesis, torch reference sampler vs the bundle in onnxruntime."""

    bundle = load_bundle(bundle_path)
    check_model_matches(bundle, model)
    if bundle.precision == "bf16":
        raise ParityError(
            f"bundle {bundle.path.name} is bf16: the runtime's onnxruntime backend has no CPU kernels for it, so the "
            "whole synthesis is not compared here (the graphs are: `unidg export parity --no-trajectory`); run it "
            "on TensorRT (`unidg export engine --bundle ...` on a GPU)"
        )
    settings = bundle.settings
    previous_settings, model.settings = model.settings, settings
    try:
        return _trajectory(bundle, model, settings, seed, steps or settings.steps, request)
    finally:
        model.settings = previous_settings


def _trajectory(bundle: Bundle, model, settings, seed: int, steps: int, request) -> TrajectoryParity:
    reference, reference_mask, source, target_mask = request or synthetic_request(seed=seed)
    diptych = settings.diptych(reference, reference_mask, source, target_mask)
    inputs = prepare_diptych(model, diptych)
    sigmas = sampling_sigmas(steps, inputs.image_tokens)
    noise = get_noise([seed], inputs.image_tokens)
    x_torch = denoise(model, noise, inputs, sigmas.tolist(), settings.guidance)
    diptych_torch = decode(model, x_torch, inputs)[0]
    image_torch = paste_back(diptych, right_half(diptych_torch), source)

    backend = OnnxRuntimeBackend.from_bundle(bundle)
    batch = bundle.batch or 1
    conditioning = StepConditioning(
        cond=np.repeat(inputs.cond.numpy(), batch, 0),
        ctx=np.repeat(inputs.ctx.numpy(), batch, 0),
        key_bias=np.repeat(inputs.key_bias.numpy(), batch, 0),
        guidance=np.full((batch,), settings.guidance, np.float32),
        img_ids=inputs.img_ids.numpy(),
        txt_ids=inputs.txt_ids.numpy(),
    )
    x = np.repeat(noise.numpy(), batch, 0)
    for i in range(steps):
        x = backend.step(x, conditioning, float(sigmas[i]), float(sigmas[i + 1]))
    latents = compare(x[:1], x_torch.numpy())

    # The full pipeline through the runtime's own host code; capture its final latents on the way.
    final: dict[str, np.ndarray] = {}
    decode_latents = backend.decode_latents

    def capturing_decode(latents_in: np.ndarray) -> np.ndarray:
        final["latents"] = latents_in
        return decode_latents(latents_in)

    backend.decode_latents = capturing_decode
    synthesizer = DefectSynthesizer(bundle, backend)
    result = synthesizer.generate(
        SynthesisRequest(reference, reference_mask, source, target_mask, seed=seed, steps=steps)
    )
    pipeline_latents = pack_latents(torch.from_numpy(final["latents"][:1])).numpy()
    backend.close()
    return TrajectoryParity(
        steps=steps,
        latents=latents,
        diptych_psnr=psnr(result.diptych, diptych_torch),
        image_psnr=psnr(result.image, image_torch),
        latents_pipeline=compare(pipeline_latents, x_torch.numpy()),
    )


def report(graphs: dict[str, GraphParity], trajectory: TrajectoryParity | None = None) -> dict:
    data = {"graphs": {name: parity.to_dict() for name, parity in graphs.items()}}
    if trajectory is not None:
        data["trajectory"] = trajectory.to_dict()
    return data


def format_report(data: dict) -> str:
    lines = []
    for name, figures in data.get("graphs", {}).items():
        verdict = {True: "pass", False: "FAIL", None: "-"}[figures["polygraphy_passed"]]
        lines.append(
            f"{name:14s} max abs {figures['max_abs']:.3g}  max rel {figures['max_rel']:.3g}  "
            f"mean abs {figures['mean_abs']:.3g}  polygraphy {verdict}"
        )
    trajectory = data.get("trajectory")
    if trajectory:
        lines.append(
            f"trajectory ({trajectory['steps']} steps): step-graph latents max abs "
            f"{trajectory['latents']['max_abs']:.3g} (rel {trajectory['latents']['max_rel']:.3g}); pipeline latents "
            f"max abs {trajectory['latents_pipeline']['max_abs']:.3g}; diptych PSNR "
            f"{trajectory['diptych_psnr']:.2f} dB; image PSNR {trajectory['image_psnr']:.2f} dB"
        )
    return "\n".join(lines)
