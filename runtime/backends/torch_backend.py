"""torch backend: runs exported programs (``torch.export``, ``.pt2``) saved in the bundle; torch is imported only here.

The GPU path where neither TensorRT nor onnxruntime-gpu is installed. Programs live beside the ONNX graphs, listed in
the manifest's files and named in its metadata:

    "torch_programs": {"step": "torch/step.pt2", "vae_encoder": "torch/vae_encoder.pt2", ...}

(without that table, ``torch/<graph>.pt2`` files in the manifest are used). Each program takes the graph's inputs
positionally in Bundle-format-v1 order (float32) and returns its one output, exactly like the ONNX graph. The loop
keeps x and the conditioning on the device between steps.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from unidg.runtime.backends.base import Backend, BackendError, BackendUnavailable, StepConditioning, step_feeds
from unidg.runtime.bundle import GRAPH_INPUTS, GRAPH_NAMES, Bundle

PROGRAM_DIR = "torch"
CONDITIONING_INPUTS = ("cond", "ctx", "key_bias", "guidance", "img_ids", "txt_ids")


def torch_program_files(bundle: Bundle) -> dict[str, str]:
    """Graph name -> program file (relative to the bundle); refuses a bundle without a complete set."""
    table = bundle.metadata.get("torch_programs")
    if table is None:
        table = {
            name: f"{PROGRAM_DIR}/{name}.pt2" for name in GRAPH_NAMES if f"{PROGRAM_DIR}/{name}.pt2" in bundle.files
        }
        if not table:
            raise BackendError(
                f"bundle {bundle.path} has no torch exported programs ({PROGRAM_DIR}/<graph>.pt2); export it with "
                "torch programs, or run it with --backend onnxruntime"
            )
    if not isinstance(table, dict):
        raise BackendError(f"bundle {bundle.path}: manifest 'torch_programs' must map graph names to files")
    missing = [name for name in GRAPH_NAMES if name not in table]
    if missing:
        raise BackendError(f"bundle {bundle.path} lacks torch programs for {missing}")
    unlisted = [table[name] for name in GRAPH_NAMES if table[name] not in bundle.files]
    if unlisted:
        raise BackendError(f"bundle {bundle.path}: torch programs {unlisted} are not listed in the manifest's files")
    return {name: table[name] for name in GRAPH_NAMES}


def _import_torch():
    try:
        import torch
    except ImportError as error:
        raise BackendUnavailable(
            f"torch not installed: the torch backend needs `pip install 'unidg[train]'`, or use --backend onnxruntime "
            f"({error})"
        ) from error
    return torch


def resolve_device(torch, device: str):
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise BackendUnavailable(f"unknown torch device {device!r} (use cpu, cuda or cuda:N)") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"torch device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
                "(torch.cuda.is_available() is False)"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"CUDA device {resolved.index} does not exist")
    return resolved


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, bundle: Bundle, programs: dict[str, Callable], device: str = "cpu") -> None:
        super().__init__(bundle)
        self.torch = _import_torch()
        self.device = resolve_device(self.torch, device)
        self.programs = programs
        self._conditioning: StepConditioning | None = None
        self._resident: dict = {}
        self._last_x: np.ndarray | None = None
        self._last_x_device = None

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: str = "cpu") -> TorchBackend:
        torch = _import_torch()
        resolved = resolve_device(torch, device)
        programs = {}
        for graph, file in torch_program_files(bundle).items():
            path = bundle.file_path(file)
            try:
                module = torch.export.load(str(path)).module()
            except Exception as error:  # torch raises many types for unreadable archives
                raise BackendError(f"torch cannot load {path} ({type(error).__name__}: {error})") from error
            programs[graph] = module.to(resolved)
        return cls(bundle, programs, str(resolved))

    @classmethod
    def from_modules(cls, bundle: Bundle, modules: dict[str, Callable], device: str = "cpu") -> TorchBackend:
        """Wrap in-memory callables with the programs' signatures (e.g. a model built from a preset, for benchmarks)."""
        return cls(bundle, modules, device)

    def _tensor(self, array: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def _run(self, graph: str, *inputs) -> np.ndarray:
        with self.torch.inference_mode():
            output = self.programs[graph](*inputs)
        if isinstance(output, tuple | list):
            (output,) = output
        return output.float().cpu().numpy()

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", self._tensor(pixels))

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", self._tensor(latents))

    def encode_reference(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("image_encoder", self._tensor(pixels))

    def step(self, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float) -> np.ndarray:
        feeds = step_feeds(x, conditioning, sigma, sigma_next)
        if conditioning is not self._conditioning:  # upload the loop's constant inputs once
            self._resident = {name: self._tensor(feeds[name]) for name in CONDITIONING_INPUTS}
            self._conditioning = conditioning
            self._last_x = None
        x_device = self._last_x_device if x is self._last_x else self._tensor(x)
        inputs = {**self._resident, "x": x_device}
        inputs["sigma"] = self._tensor(feeds["sigma"])
        inputs["sigma_next"] = self._tensor(feeds["sigma_next"])
        with self.torch.inference_mode():
            output = self.programs["step"](*(inputs[name] for name in GRAPH_INPUTS["step"]))
        if isinstance(output, tuple | list):
            (output,) = output
        self._last_x_device = output
        self._last_x = output.float().cpu().numpy()
        return self._last_x

    def close(self) -> None:
        self.programs, self._resident = {}, {}
        self._conditioning = self._last_x = self._last_x_device = None
