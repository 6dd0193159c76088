"""Which onnxruntime distribution this station has. Every onnxruntime build (CPU, CUDA, DirectML, OpenVINO...) is its
own pip package installing the same ``onnxruntime`` module, so two of them overwrite each other's files: the module
then comes from whichever was installed last, with its providers and possibly a mix of both packages' libraries.
Read from the installed packages' metadata, without importing onnxruntime.
"""

from __future__ import annotations

import importlib.metadata
import re

# Packages that install the `onnxruntime` module (onnxruntime's own builds on PyPI).
ONNXRUNTIME_PACKAGES = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
    "onnxruntime-training",
)
INSTALL_FIX = (
    "pip uninstall -y {names} && pip install 'unidg[gpu]' (a CUDA GPU station: onnxruntime-gpu) or "
    "pip install 'unidg[cpu]' (a CPU station: onnxruntime)"
)


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_onnxruntime_packages(path: list[str] | None = None) -> dict[str, str]:
    """{package: version} of the onnxruntime packages installed (on ``path``, default sys.path)."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions(**({"path": path} if path is not None else {})):
        name = _normalized(dist.metadata["Name"] or "")
        if name in ONNXRUNTIME_PACKAGES:
            found.setdefault(name, dist.version)
    return found


def onnxruntime_install_problem(path: list[str] | None = None) -> str | None:
    """Why the installed onnxruntime cannot be trusted (none, or several packages owning one module), or None."""
    found = installed_onnxruntime_packages(path)
    if not found:
        return "onnxruntime is not installed; " + INSTALL_FIX.format(names="onnxruntime").split(" && ", 1)[1]
    if len(found) > 1:
        listed = " and ".join(f"{name} {version}" for name, version in sorted(found.items()))
        return (
            f"{listed} are installed side by side; they install the same `onnxruntime` module, so it is whichever "
            f"came last (providers and libraries may be mixed); keep exactly one: "
            + INSTALL_FIX.format(names=" ".join(sorted(found)))
        )
    return None
