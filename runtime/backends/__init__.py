"""Runtime backends: the same sampler over onnxruntime (CPU/GPU), TensorRT engines, or torch exported programs.

``create_backend(name, bundle, **options)`` imports a backend only when asked for, so the lean install needs neither
TensorRT nor torch.
"""

from __future__ import annotations

import importlib

from unidg.runtime.backends.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    GenerationCancelled,
    NonFiniteOutputError,
    StepConditioning,
    device_options,
)
from unidg.runtime.backends.onnxruntime_packages import onnxruntime_install_problem
from unidg.runtime.bundle import Bundle

# name -> (module, class)
BACKENDS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("unidg.runtime.backends.onnxruntime_backend", "OnnxRuntimeBackend"),
    "tensorrt": ("unidg.runtime.backends.tensorrt_backend", "TensorRTBackend"),
    "torch": ("unidg.runtime.backends.torch_backend", "TorchBackend"),
}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    if name == "onnxruntime":
        problem = onnxruntime_install_problem()  # checked before the import, which may half-work on a mixed install
        if problem:
            raise BackendUnavailable(problem)
    module_name, class_name = BACKENDS[name]
    return getattr(importlib.import_module(module_name), class_name)


def create_backend(name: str, bundle: Bundle, **options: object) -> Backend:
    """Create backend ``name`` for ``bundle``; options are backend-specific (onnxruntime: providers=["cuda"])."""
    if bundle.text and name not in ("onnxruntime", "torch"):
        raise BackendError(
            f"bundle {bundle.path} is a UniDG-Text bundle: its step takes the instruction's pooled features, which "
            "only the onnxruntime and torch backends feed so far; use --backend onnxruntime (--device cuda on a GPU), "
            "or --backend torch with a bundle exported with --torch-programs"
        )
    return backend_class(name).from_bundle(bundle, **options)


__all__ = [
    "BACKENDS",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "GenerationCancelled",
    "NonFiniteOutputError",
    "StepConditioning",
    "backend_class",
    "create_backend",
    "device_options",
]
