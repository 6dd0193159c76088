"""onnxruntime backend: CPU everywhere; CUDA / TensorRT execution providers where onnxruntime-gpu is installed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from unidg.runtime.backends.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    StepConditioning,
    StepHead,
    cache_feeds,
    step_feeds,
)
from unidg.runtime.bundle import (
    CACHE_GRAPH_NAMES,
    CACHE_GRAPH_OUTPUTS,
    GRAPH_INPUTS,
    GRAPH_NAMES,
    GRAPH_OUTPUTS,
    Bundle,
    expected_cache_shapes,
    expected_shapes,
    shape_mismatch,
)
from unidg.runtime.cpu_cores import available_cores

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


def cpu_session_options(threads: int | None = None, spin: bool = False) -> ort.SessionOptions:
    """Session options of the runtime's graphs: ``threads`` intra-op threads (default: the cores this process may use),
    idle threads spinning only with ``spin`` (see OnnxRuntimeBackend.from_bundle), warnings off."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads) if threads else available_cores()
    for pool in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{pool}.allow_spinning", "1" if spin else "0")
    options.log_severity_level = 3
    return options


# The bundle graphs' newest operators (opset 23: Attention, RMSNormalization, RotaryEmbedding) have kernels from here.
MIN_ONNXRUNTIME = "1.23"


def session_load_error(path: Path, error: Exception) -> BackendError:
    """Why onnxruntime could not load a bundle graph, and the fix: an operator this onnxruntime has no kernel for
    needs a newer onnxruntime (the graph is fine); anything else, a re-export."""
    text = f"{type(error).__name__}: {error}"
    if "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text:
        return BackendError(
            f"onnxruntime {ort.__version__} has no kernel for an operator of {path} ({text}); the bundle graphs use "
            f"opset-23 operators that need onnxruntime >= {MIN_ONNXRUNTIME}: pip install -U 'onnxruntime>="
            f"{MIN_ONNXRUNTIME}' (or onnxruntime-gpu)"
        )
    return BackendError(f"onnxruntime cannot load {path} ({text}); re-export the bundle")


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
        spin: bool = False,
    ) -> OnnxRuntimeBackend:
        """Sessions for the bundle's graphs (the four of the format, and its step-cache graphs when it has them).

        ``threads``: intra-op threads (default: the cores this process may use, see ``available_cores``). ``spin``:
        let idle pool threads busy-wait for the next kernel. Off by default: on cores shared with other work (cameras,
        the inspection model) spinning threads steal the time the working ones need (1.7-4.9x slower at 2 threads
        on a loaded 2-core machine, docs/runtime.md); on a dedicated machine it saves the wake-up latency between
        small kernels.
        """
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
        options = cpu_session_options(threads, spin)
        extra: dict = {}
        if bundle.precision == "fp8":
            # ModelOpt FP8 Q/DQ only run in onnxruntime with this graph rewrite off.
            extra["disabled_optimizers"] = ["QDQPropagationTransformer"]
        sessions = {}
        for name in (*GRAPH_NAMES, *(CACHE_GRAPH_NAMES if bundle.cache_graphs else ())):
            path = bundle.graph_path(name)
            try:
                sessions[name] = ort.InferenceSession(
                    str(path), options, providers=resolved, provider_options=provider_options, **extra
                )
            except Exception as error:  # onnxruntime raises its own exception types for unreadable graphs
                raise session_load_error(path, error) from error
            _check_session(bundle, name, sessions[name])
        return cls(bundle, sessions, resolved)

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        (output,) = self._run_all(graph, feeds, (GRAPH_OUTPUTS[graph][0],))
        return output

    def _run_all(self, graph: str, feeds: dict[str, np.ndarray], outputs: tuple[str, ...]) -> list[np.ndarray]:
        if graph not in self.sessions:  # only a step-cache graph can be absent: the bundle has none
            raise BackendError(
                f"bundle {self.bundle.path} has no step-cache graphs; add them with `unidg export cache-graphs`, "
                "or run with --cache off"
            )
        try:
            return self.sessions[graph].run(list(outputs), feeds)
        except Exception as error:
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            raise BackendError(
                f"onnxruntime failed running {self.bundle.graph_path(graph)} with inputs {shapes}: {error}"
            ) from error

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", {"latents": np.ascontiguousarray(latents, dtype=np.float32)})

    def encode_reference(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("image_encoder", {"pixels": np.ascontiguousarray(pixels, dtype=np.float32)})

    def step(self, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float) -> np.ndarray:
        return self._run("step", step_feeds(x, conditioning, sigma, sigma_next))

    def step_head(self, x: np.ndarray, conditioning: StepConditioning, sigma: float) -> StepHead:
        feeds = cache_feeds("step_head", x.shape[0], {**step_feeds(x, conditioning, sigma, sigma)}, sigma, sigma)
        return StepHead(*self._run_all("step_head", feeds, CACHE_GRAPH_OUTPUTS["step_head"]))

    def step_tail(
        self, head: StepHead, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float
    ) -> tuple[np.ndarray, np.ndarray]:
        arrays = {**step_feeds(x, conditioning, sigma, sigma_next), **vars(head)}
        feeds = cache_feeds("step_tail", x.shape[0], arrays, sigma, sigma_next)
        x_next, tail_residual = self._run_all("step_tail", feeds, CACHE_GRAPH_OUTPUTS["step_tail"])
        return x_next, tail_residual

    def step_cached(
        self, head: StepHead, tail_residual: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float
    ) -> np.ndarray:
        arrays = {"hidden": head.hidden, "tail_residual": tail_residual, "temb": head.temb, "x": x}
        feeds = cache_feeds("step_cached", x.shape[0], arrays, sigma, sigma_next)
        (x_next,) = self._run_all("step_cached", feeds, CACHE_GRAPH_OUTPUTS["step_cached"])
        return x_next

    def onnxruntime_placement(self) -> tuple[list[str], list[dict] | None, ort.SessionOptions | None]:
        session = self.sessions["step"]
        providers = session.get_providers()
        options = session.get_provider_options()
        return providers, [options.get(p, {}) for p in providers], session.get_session_options()

    def close(self) -> None:
        self.sessions = {}


def _check_session(bundle: Bundle, graph: str, session: ort.InferenceSession) -> None:
    """The ONNX file must have the inputs/outputs and shapes the manifest promises (catches swapped graph files)."""
    batch = bundle.batch if bundle.batch is not None else "batch"
    if graph in CACHE_GRAPH_NAMES:
        want = expected_cache_shapes(bundle.metadata, int(bundle.step_cache["hidden_dim"]), batch)[graph]
        tensors = (*bundle.cache_inputs[graph], *CACHE_GRAPH_OUTPUTS[graph])
    else:
        want = expected_shapes(bundle.metadata, batch)[graph]
        inputs = bundle.step_inputs if graph == "step" else GRAPH_INPUTS[graph]
        tensors = (*inputs, *GRAPH_OUTPUTS[graph])
    path = bundle.graph_path(graph)
    have = {arg.name: arg for arg in [*session.get_inputs(), *session.get_outputs()]}
    for tensor in tensors:
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
