"""Triton Inference Server Python-backend model for UniDG defect synthesis (``unidg/1/model.py``).

Written into a model repository by ``unidg export triton``; runs inside Triton's Python backend, whose Python
environment must have the lean ``unidg`` runtime installed (``pip install unidg`` or ``unidg[gpu]``) and, under
Triton 24.10 (server 2.51) and older, numpy < 2 (``check_tensor_transport``; docs/triton.md says how the stub picks
its environment). It wraps the runtime's ``DefectSynthesizer``; the sampler is not re-implemented here. A UniDG-Text
bundle also needs ``tokenizers`` there (``pip install 'unidg[text]'``) for its instructions.

Inputs (no Triton batching: max_batch_size 0, one image set per request):
    REFERENCE UINT8 [H, W, 3], REFERENCE_MASK UINT8 [H, W] (nonzero = defect), SOURCE UINT8 [h, w, 3],
    TARGET_MASK UINT8 [h, w] (nonzero = where the defect goes); optional SEED INT64 [1] (default: drawn at random
    and reported), STEPS INT32 [1], GUIDANCE FP32 [1] (default: the bundle's), CATEGORY BYTES [1].
    UniDG-Text bundles: optional PROMPT BYTES [1] (the instruction, UTF-8; default with a reference: the bundle's
    reference instruction); with a PROMPT, REFERENCE and REFERENCE_MASK may be left out (both: the instruction alone).
Outputs: IMAGE UINT8 [h, w, 3] (equal to SOURCE outside MASK), MASK UINT8 [h, w] (0/255, the dilated target mask),
    METADATA BYTES [1] (JSON: seed, steps, timings, bundle fingerprint, the Triton instance that served it...).

Graphs run either in this process (onnxruntime, from the bundle copied next to this file), or, for a bundle with
TensorRT engines, as ``tensorrt_plan`` models of the same repository called through BLS (``engine_models``
parameter: graph -> model name). A request cancelled by Triton stops at the next denoising step.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from unidg.core import images
from unidg.core.images import InputError
from unidg.runtime.backends import create_backend
from unidg.runtime.backends.base import Backend, BackendError, StepConditioning, step_feeds
from unidg.runtime.bundle import GRAPH_OUTPUTS, Bundle, load_bundle
from unidg.runtime.sampler import DEFAULT_SEED, GenerationCancelled
from unidg.runtime.serve import jsonable
from unidg.runtime.synthesizer import DefectSynthesizer, RequestError, SynthesisRequest, resolve_step_cache

IMAGE_INPUTS = ("REFERENCE", "SOURCE")
MASK_INPUTS = ("REFERENCE_MASK", "TARGET_MASK")
REFERENCE_INPUTS = ("REFERENCE", "REFERENCE_MASK")  # optional beside a PROMPT (UniDG-Text)
# The runtime names inputs in words; Triton clients know the tensor names.
TENSOR_OF_INPUT = {
    images.REFERENCE_IMAGE: "REFERENCE",
    images.REFERENCE_MASK: "REFERENCE_MASK",
    images.SOURCE_IMAGE: "SOURCE",
    images.TARGET_MASK: "TARGET_MASK",
}


class TritonBLSBackend(Backend):
    """The bundle's graphs as TensorRT models of the same Triton server, called with Business Logic Scripting."""

    name = "triton-bls"

    def __init__(self, bundle: Bundle, models: dict[str, str]) -> None:
        super().__init__(bundle)
        missing = [graph for graph in GRAPH_OUTPUTS if graph not in models]
        if missing:
            raise BackendError(
                f"the engine_models parameter lacks the graphs {missing}; regenerate the repository with "
                "`unidg export triton`"
            )
        self.models = models

    @classmethod
    def from_bundle(cls, bundle: Bundle, **options: object) -> TritonBLSBackend:
        return cls(bundle, dict(options["models"]))  # type: ignore[arg-type]

    def _run(self, graph: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        output = GRAPH_OUTPUTS[graph][0]
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value, dtype=np.float32)) for name, value in feeds.items()
        ]
        options: dict = {}
        if hasattr(pb_utils, "PreferredMemory"):  # ask for host memory: the sampler works on numpy between steps
            options["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        request = pb_utils.InferenceRequest(
            model_name=self.models[graph], requested_output_names=[output], inputs=tensors, **options
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"model {self.models[graph]} ({graph} graph) failed: {response.error().message()}")
        tensor = pb_utils.get_output_tensor_by_name(response, output)
        if tensor.is_cpu():
            return tensor.as_numpy()
        raise RuntimeError(
            f"model {self.models[graph]} returned {output} in GPU memory; this Triton lacks PreferredMemory"
        )

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", {"pixels": pixels})

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", {"latents": latents})

    def encode_reference(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("image_encoder", {"pixels": pixels})

    def step(self, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float) -> np.ndarray:
        return self._run("step", step_feeds(x, conditioning, sigma, sigma_next))


def _error(message: str, invalid: bool) -> object:
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid else "INTERNAL", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


def check_tensor_transport() -> None:
    """Refuse to serve where the Python-backend stub copies tensors wrongly (checked once, at model load).

    Stubs built with pybind11 < 2.12 -- Triton 24.10 (server 2.51) and older, e.g. the one in nvidia-pytriton 0.7.0 --
    read numpy's dtype record at its NumPy 1 layout. Under NumPy 2 the item size they read is 0, so every tensor
    the stub copies repeats its first element (masks all zero, images one colour), outputs arrive empty and a BYTES
    input aborts the stub. A uint8 tensor sent through the stub's own copy path shows it before any request does.
    """
    probe = np.arange(1, 9, dtype=np.uint8)
    copied = pb_utils.Tensor.from_dlpack("probe", pb_utils.Tensor("probe", probe).to_dlpack()).as_numpy()
    if not np.array_equal(np.asarray(copied).reshape(-1), probe):
        raise RuntimeError(
            f"this Triton Python-backend stub corrupts tensors under numpy {np.__version__} (a tensor [1..8] came "
            f"back as {np.asarray(copied).reshape(-1).tolist()}): stubs of Triton 24.10 (server 2.51) and older, "
            "such as nvidia-pytriton 0.7.0's, need numpy<2 in the model's Python environment; or use Triton 24.11 "
            "(server 2.52) or newer. See docs/triton.md."
        )


def _input_error_message(error: InputError) -> str:
    tensor = TENSOR_OF_INPUT.get(error.name)
    return str(error) if tensor is None else f"input {tensor} ({error.name}): {error.problem}"


def _optional_scalar(request: object, name: str) -> object | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one value (got {values.size})")
    value = values[0]
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value.item() if isinstance(value, np.generic) else value


def _prompt(request: object) -> str | None:
    """The PROMPT input as text (None when absent); bytes that are not UTF-8 are refused naming it."""
    tensor = pb_utils.get_input_tensor_by_name(request, "PROMPT")
    if tensor is None:
        return None
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise RequestError(f"input PROMPT must hold exactly one instruction (got {values.size})", "prompt")
    value = values[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(
                f"input PROMPT must be UTF-8 text (byte 0x{value[error.start]:02x} at offset {error.start} is not); "
                "send the instruction encoded as UTF-8",
                "prompt",
            ) from None
    return str(value)


def _request_error_message(error: RequestError) -> str:
    return f"input PROMPT: {error}" if error.option == "prompt" and "input PROMPT" not in str(error) else str(error)


def _progress_of(request: object) -> object:
    """Stop at the next step once Triton cancels the request (client gone, timeout); older Tritons never do."""
    cancelled = getattr(request, "is_cancelled", None)
    if cancelled is None:
        return None
    return lambda step, total: not cancelled()


class TritonPythonModel:
    """Triton's Python-backend entry points: initialize, execute, finalize."""

    def initialize(self, args: dict) -> None:
        check_tensor_transport()
        config = json.loads(args["model_config"])
        params = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        bundle_dir = Path(params.get("bundle_dir", "bundle"))
        if not bundle_dir.is_absolute():
            bundle_dir = Path(args["model_repository"]) / str(args["model_version"]) / bundle_dir
        engine_models = json.loads(params.get("engine_models") or "{}")
        if engine_models:
            # The engines were checked against the manifest (sha256) when the repository was written; the ONNX graphs
            # are not copied for an engine repository, so only the manifest is read here.
            bundle = load_bundle(bundle_dir, verify=False)
            backend: Backend = TritonBLSBackend(bundle, engine_models)
        else:
            bundle = load_bundle(bundle_dir, verify=params.get("verify_bundle", "true").lower() != "false")
            options: dict = {}
            if params.get("threads"):
                options["threads"] = int(params["threads"])
            providers = [p.strip() for p in params.get("providers", "").split(",") if p.strip()]
            if not providers and args.get("model_instance_kind") == "GPU":
                providers = ["cuda"]
            if providers:
                options["providers"] = providers
                if "cuda" in providers and args.get("model_instance_device_id") is not None:
                    device = {"device_id": int(args["model_instance_device_id"])}
                    per_provider = [device if p == "cuda" else {} for p in providers]
                    # the runtime appends the CPU provider as the fallback when it is not listed
                    options["provider_options"] = per_provider + ([] if "cpu" in providers else [{}])
            backend = create_backend(params.get("backend", "onnxruntime"), bundle, **options)
        threshold = params.get("cache_threshold") or None
        step_cache, chosen = resolve_step_cache(
            bundle, backend, params.get("cache") or None, None if threshold is None else float(threshold)
        )
        self.synthesizer = DefectSynthesizer(bundle, backend, step_cache=step_cache, cache_chosen=chosen)
        self.model_name = args.get("model_name", "unidg")
        self.instance_name = args.get("model_instance_name", self.model_name)

    def _synthesis_request(self, request: object) -> SynthesisRequest:
        prompt = _prompt(request)
        arrays: dict[str, np.ndarray | None] = {}
        for name in (*IMAGE_INPUTS, *MASK_INPUTS):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None and prompt is not None and name in REFERENCE_INPUTS:
                arrays[name] = None  # the instruction alone; one of the pair without the other: the runtime says so
                continue
            if tensor is None:
                text = name in REFERENCE_INPUTS and self.synthesizer.bundle.text
                raise RequestError(f"input {name} is missing" + (" (or send a PROMPT alone)" if text else ""))
            value = tensor.as_numpy()
            if value.dtype != np.uint8:
                raise RequestError(f"input {name} must be UINT8 (got {value.dtype})")
            arrays[name] = value != 0 if name in MASK_INPUTS else value
        seed = _optional_scalar(request, "SEED")
        steps = _optional_scalar(request, "STEPS")
        guidance = _optional_scalar(request, "GUIDANCE")
        return SynthesisRequest(
            reference=arrays["REFERENCE"],
            reference_mask=arrays["REFERENCE_MASK"],
            source=arrays["SOURCE"],
            target_mask=arrays["TARGET_MASK"],
            seed=DEFAULT_SEED if seed is None else seed,
            steps=steps,
            guidance=None if guidance is None else float(guidance),
            category=_optional_scalar(request, "CATEGORY") or None,
            prompt=prompt,
            name=self.model_name,
        )

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                result = self.synthesizer.generate(self._synthesis_request(request), progress=_progress_of(request))
                metadata = json.dumps(jsonable({**result.metadata, "triton_instance": self.instance_name}))
                metadata = metadata.encode("utf-8")
                outputs = [
                    pb_utils.Tensor("IMAGE", np.ascontiguousarray(result.image, dtype=np.uint8)),
                    pb_utils.Tensor("MASK", np.where(result.mask, 255, 0).astype(np.uint8)),
                    pb_utils.Tensor("METADATA", np.array([metadata], dtype=np.object_)),
                ]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except InputError as error:
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[], error=_error(_input_error_message(error), True))
                )
            except RequestError as error:
                message = _request_error_message(error)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(message, True)))
            except ValueError as error:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(str(error), True)))
            except GenerationCancelled as error:
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[], error=_error(f"cancelled: {error}", False))
                )
            except Exception as error:  # one failed request must not take the model down
                message = f"{type(error).__name__}: {error}"
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(message, False)))
        return responses

    def finalize(self) -> None:
        self.synthesizer.close()
