"""``unidg export adopt``: plans built by trtexec (from ``unidg export trtexec --out DIR``) put into a new bundle the
runtime's TensorRT backend accepts.

The plans folder holds what ``unidg export trtexec`` wrote (``trtexec.json``: each plan's graph, profile and flags and
the source bundle's fingerprint) and what trtexec made from its script (the plans and each build's log). Adopting
checks, per plan: the build log says trtexec passed, which TensorRT built it (>= the version bundle graphs need) and
for which GPU (compute capability and name, the same for every plan), and that its input build shapes are the
recorded profile; the source bundle is the one the commands were written for. With TensorRT importable on a GPU, each
plan is also deserialized and its profile shapes read from the engine itself. The new bundle is the source bundle's
files (hard-linked where possible), the plans under ``engines/``, the derived graphs the plans were parsed from, and a
manifest with the ``engines`` table and the sha256 of every file; the source bundle and the plans folder are only read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from unidg.core.manifest import read_manifest, sha256_file, write_manifest
from unidg.core.staging import staged_folder
from unidg.export.engine import EngineError
from unidg.export.tensorrt_graphs import link_or_copy
from unidg.export.trtexec import TRTEXEC_DESCRIPTION, TRTEXEC_FORMAT
from unidg.runtime.backends.tensorrt_engines import parse_compute_capability, tensorrt_version_problem
from unidg.runtime.bundle import CACHE_GRAPH_NAMES, GRAPH_NAMES, load_bundle

# trtexec's log lines (sampleDevice / sampleOptions / sampleReporting).
_VERSION = re.compile(r"TensorRT version: (\d+(?:\.\d+)*)")
_DEVICE = re.compile(r"Selected Device: (.+)")
_CAPABILITY = re.compile(r"Compute Capability: (\d+\.\d+)")
_BUILD_SHAPE = re.compile(r"Input build shape(?: \(profile \d+\))?: ([^=\s]+)=(\S+)\+(\S+)\+(\S+)")
_PASSED = "&&&& PASSED TensorRT.trtexec"


class AdoptError(EngineError):
    """Plans cannot be adopted into a bundle; the message names the plan or file and the fix."""


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split("x")] if text else []


def read_build_log(path: Path) -> dict:
    """What a trtexec build log says: TensorRT version, device, compute capability, input build shapes, passed."""
    if not path.is_file():
        raise AdoptError(f"build log {path} is missing; run the build commands of trtexec.sh, which write it")
    text = path.read_text(errors="replace")
    facts: dict = {"passed": _PASSED in text, "shapes": {}}
    for key, pattern in (("tensorrt_version", _VERSION), ("device_name", _DEVICE), ("capability", _CAPABILITY)):
        found = pattern.search(text)
        facts[key] = found.group(1).strip() if found else None
    for name, lo, opt, hi in _BUILD_SHAPE.findall(text):
        facts["shapes"][name] = [_dims(lo), _dims(opt), _dims(hi)]
    return facts


def _check_plan(graph: str, entry: dict, facts: dict, log: Path) -> None:
    if not facts["passed"]:
        raise AdoptError(f"{graph}: {log} does not say '{_PASSED}'; the build failed or did not finish; rebuild it")
    for key in ("tensorrt_version", "capability", "device_name"):
        if not facts[key]:
            raise AdoptError(f"{graph}: {log} names no {key.replace('_', ' ')}; give the full trtexec output")
    problem = tensorrt_version_problem(facts["tensorrt_version"])
    if problem:
        raise AdoptError(f"{graph}: {problem}")
    if facts["shapes"]:
        recorded = {name: corners for name, corners in entry["profile"].items()}
        if facts["shapes"] != recorded:
            raise AdoptError(
                f"{graph}: {log} was built with input shapes {facts['shapes']} but trtexec.json asks for {recorded}; "
                "run the build command as written"
            )
    elif any(not (lo == opt == hi) for lo, opt, hi in entry["profile"].values()):
        raise AdoptError(f"{graph}: {log} shows no input build shapes but the profile is dynamic; rebuild it")


def _check_plans_with_tensorrt(plans: dict[str, Path], description: dict) -> bool:
    """Deserialize each plan and compare its profile shapes with the recorded ones; False without TensorRT/GPU."""
    try:
        import tensorrt as trt  # optional: only on stations with TensorRT
    except ImportError:
        return False
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for graph, path in plans.items():
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise AdoptError(f"{graph}: TensorRT {trt.__version__} cannot deserialize {path} (see its log above)")
        for name, corners in description["plans"][graph]["profile"].items():
            shapes = [list(s) for s in engine.get_tensor_profile_shape(name, 0)]
            if shapes != corners:
                raise AdoptError(f"{graph}: plan {path} has profile {shapes} for {name}, trtexec.json {corners}")
    return True


def adopt_plans(bundle_path: str | Path, plans_dir: str | Path, out: str | Path, *, replace: bool = False) -> dict:
    """Write ``out``: the bundle ``bundle_path`` with the trtexec-built plans of ``plans_dir``; returns its engines
    table."""
    bundle = load_bundle(bundle_path, verify=True)
    plans_dir = Path(plans_dir)
    description_path = plans_dir / TRTEXEC_DESCRIPTION
    if not description_path.is_file():
        raise AdoptError(
            f"--plans {plans_dir} has no {TRTEXEC_DESCRIPTION}; pass the --out folder of `unidg export trtexec`"
        )
    description = json.loads(description_path.read_text())
    if description.get("format") != TRTEXEC_FORMAT:
        raise AdoptError(f"{description_path} is not a unidg trtexec description (format {description.get('format')})")
    if description["bundle"]["fingerprint"] != bundle.fingerprint:
        raise AdoptError(
            f"--plans {plans_dir} was written for bundle {description['bundle']['path']} (fingerprint "
            f"{description['bundle']['fingerprint'][:12]}), not {bundle.path} ({bundle.fingerprint[:12]}); adopt "
            "them into that bundle or print new commands for this one"
        )
    missing = [graph for graph in GRAPH_NAMES if graph not in description["plans"]]
    if missing:
        raise AdoptError(
            f"--plans {plans_dir} has no plans for {missing}; the runtime needs all of {list(GRAPH_NAMES)} "
            "(print the commands without --graphs)"
        )
    # the step-cache graphs' plans come along where the commands built them (a bundle with step-cache graphs)
    adopted = (*GRAPH_NAMES, *(g for g in CACHE_GRAPH_NAMES if g in description["plans"] and bundle.cache_graphs))
    plan_files, facts = {}, {}
    for graph in adopted:
        entry = description["plans"][graph]
        plan_files[graph] = plans_dir / entry["file"]
        if not plan_files[graph].is_file():
            raise AdoptError(f"{graph}: plan {plan_files[graph]} is missing; run its build command in trtexec.sh")
        log = plans_dir / entry["log"]
        facts[graph] = read_build_log(log)
        _check_plan(graph, entry, facts[graph], log)
    target = {(f["tensorrt_version"], f["capability"], f["device_name"]) for f in facts.values()}
    if len(target) != 1:
        raise AdoptError(f"the plans were built by different TensorRT versions or GPUs {sorted(target)}; rebuild them")
    ((version, capability, device_name),) = target
    deserialized = _check_plans_with_tensorrt(plan_files, description)

    plans = {}
    with staged_folder(out, replace=replace) as staging:
        for relative in bundle.files:
            link_or_copy(bundle.path / relative, staging / relative)
        for graph in adopted:
            entry = dict(description["plans"][graph])
            link_or_copy(plan_files[graph], staging / entry["file"])
            if entry.pop("derived"):
                link_or_copy(plans_dir / entry["onnx"], staging / entry["onnx"])
            for key in ("log", "profile"):
                entry.pop(key)
            entry["sha256"] = sha256_file(staging / entry["file"])
            plans[graph] = entry
        table = {
            "tensorrt_version": version,
            "compute_capability": list(parse_compute_capability(capability)),
            "device_name": device_name,
            "version_compatible": description["version_compatible"],
            "hardware_compatibility": description["hardware_compatibility"],
            "built_with": "trtexec",
            "checked_by_deserializing": deserialized,
            "plans": plans,
        }
        metadata = dict(read_manifest(bundle.path, kind="bundle").metadata)
        metadata["engines"] = table
        write_manifest(staging, "bundle", metadata)
    return table
