"""onnxruntime backend: CPU everywhere; CUDA / TensorRT execution providers where onnxruntime-gpu is installed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from unidg.runtime.backends.base import Backend, BackendError, BackendUnavailable, StepConditioning, step_feeds
from unidg.runtime.bundle import GRAPH_INPUTS, GRAPH_NAMES, GRAPH_OUTPUTS, Bundle, expected_shapes, shape_mismatch

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(requested: Sequence[str] | str, available: Sequence[str]) -> list[str]:
    """Map short names (cpu, cuda, tensorrt) to onnxruntime providers; refuse ones this install lacks.

    CPU is appended as the fallback for nodes a GPU provider does not take (onnxruntime's own convention).
    """
    names = [requested] if isinstance(requested, str) else list(requested)
    if not names:
        names = ["cpu"]
    resolved = [PROVIDER_ALIASES.get(name.lower(), name) for name in names]
    missing = [name for name in resolved if name not in available]
    if missing:
        hint = (
            " onnxruntime-gpu provides the CUDA and TensorRT providers: `pip install 'unidg[gpu]'` (in place of "
            "onnxruntime)"
            if any(m != "CPUExecutionProvider" for m in missing)
            else ""
        )
        raise BackendUnavailable(
            f"onnxruntime execution provider(s) {missing} are not available (this onnxruntime "
            f"{ort.__version__} has {list(available)}).{hint}"
        )
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def _session_shape(arg: ort.NodeArg) -> tuple[int | str, ...]:
    return tuple(d if isinstance(d, int) else str(d) for d in arg.shape)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, sessions: dict[str, ort.InferenceSession], providers: list[str]) -> None:
        super().__init__(bundle)
        self.sessions = sessions
        self.providers = providers

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        providers: Sequence[str] | str = ("cpu",),
        threads: int | None = None,
        provider_options: Sequence[dict] | None = None,
    ) -> OnnxRuntimeBackend:
        resolved = resolve_providers(providers, ort.get_available_providers())
        computes_bf16 = (
            bundle.precision == "bf16" or bundle.metadata.get("quantization", {}).get("high_precision") == "bf16"
        )
        if computes_bf16 and all(p == "CPUExecutionProvider" for p in resolved):
            raise BackendError(
                f"bundle {bundle.path} computes in bf16 ({bundle.precision}); onnxruntime's CPU provider has no bf16 "
                "kernels: run it with --backend tensorrt or on a CUDA device, or export it for the CPU "
                "(`unidg export onnx --precision fp32`, `unidg export quantize --high-precision fp32`)"
            )
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3
        extra: dict = {}
        if bundle.precision == "fp8":
            # ModelOpt FP8 Q/DQ only run in onnxruntime with this graph rewrite off.
            extra["disabled_optimizers"] = ["QDQPropagationTransformer"]
        sessions = {}
        for name in GRAPH_NAMES:
            path = bundle.graph_path(name)
            try:
                sessions[name] = ort.InferenceSession(
                    str(path), options, providers=resolved, provider_options=provider_options, **extra
                )
            except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
                raise BackendError(
                    f"onnxruntime cannot load {path} ({type(error).__name__}: {error}); re-export the bundle"
                ) from error
            _check_session(bundle, name, sessions[name])
        return cls(bundle, sessions, resolved)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        try:
            (output,) = self.sessions[graph].run([GRAPH_OUTPUTS[graph][0]], feeds)
        except Exception as error:
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            raise BackendError(
                f"onnxruntime failed running {self.bundle.graph_path(graph)} with inputs {shapes}: {error}"
            ) from error
        return output

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", {"latents": np.ascontiguousarray(latents, dtype=np.float32)})

    def encode_reference(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("image_encoder", {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})

    def step(self, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float) -> np.ndarray:
        return self._run("step", step_feeds(x, conditioning, sigma, sigma_next))

    def close(self) -> None:
        self.sessions = {}


def _check_session(bundle: Bundle, graph: str, session: ort.InferenceSession) -> None:
    """The ONNX file must have the inputs/outputs and shapes the manifest promises (catches swapped graph files)."""
    want = expected_shapes(bundle.metadata, bundle.batch if bundle.batch is not None else "batch")[graph]
    path = bundle.graph_path(graph)
    have = {arg.name: arg for arg in [*session.get_inputs(), *session.get_outputs()]}
    for tensor in (*GRAPH_INPUTS[graph], *GRAPH_OUTPUTS[graph]):
        if tensor not in have:
            raise BackendError(f"{path} has no tensor '{tensor}' (has {sorted(have)}); re-export the bundle")
        if have[tensor].type != "tensor(float)":
            raise BackendError(f"{path} tensor '{tensor}' is {have[tensor].type}, Bundle format v1 needs float32")
        shape = _session_shape(have[tensor])
        if shape_mismatch(want[tensor], shape):
            raise BackendError(
                f"{path} tensor '{tensor}' has shape {list(shape)} but the bundle manifest says {list(want[tensor])}: "
                "the graph was exported for other settings; re-export the bundle"
            )
