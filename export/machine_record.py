"""What a benchmark ran on: nvidia-smi, the GPU as torch sees it, library versions and which optional libraries
import."""

from __future__ import annotations

import os
import platform
import subprocess
import sys


def _version(module: str) -> str | None:
    try:
        imported = __import__(module)
    except Exception:  # noqa: BLE001 - a broken optional install is recorded as absent, not fatal
        return None
    return str(getattr(imported, "__version__", "unknown"))


def _command_output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"not available: {type(error).__name__}: {error}"
    return (done.stdout + done.stderr).strip()


def machine_record(torch) -> dict:
    """What the run ran on: nvidia-smi, the GPU as torch sees it, torch/CUDA/cuDNN/Triton versions, and which of
    tensorrt, onnxruntime(-gpu), diffusers, transformers and torchao import."""
    record: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _version("triton"),
        "nvidia_smi": _command_output(["nvidia-smi"]),
        "nvidia_smi_query": _command_output(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit",
                "--format=csv",
            ]
        ),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        record["gpu"] = {
            "name": properties.name,
            "capability": f"{properties.major}.{properties.minor}",
            "multiprocessors": properties.multi_processor_count,
            "memory_gib": round(properties.total_memory / 2**30, 1),
        }
    imports = {name: _version(name) for name in ("tensorrt", "onnxruntime", "diffusers", "transformers", "torchao")}
    providers: list[str] = []
    if imports["onnxruntime"]:
        import onnxruntime  # optional: recorded above as importable

        providers = list(onnxruntime.get_available_providers())
    imports["onnxruntime_providers"] = providers
    imports["onnxruntime_gpu"] = "CUDAExecutionProvider" in providers
    record["imports"] = imports
    return record
