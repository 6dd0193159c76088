"""``unidg export check``: each graph of a bundle on onnxruntime against its TensorRT form on TensorRT, in polygraphy's
vocabulary, with the thresholds of the quantization accuracy gate (``unidg.export.quantize_accuracy``).

Per graph, two ``polygraphy run`` commands:

1. onnxruntime (CPU) runs the bundle's graph on polygraphy's seeded random inputs and saves inputs and outputs as
   polygraphy JSON. A bf16 graph runs as its float32 emulation (``unidg.export.bf16_emulation``, written into
   ``--out``: onnxruntime's CPU provider has no bf16 kernels); an FP8 step graph with graph optimizations off (as the
   accuracy gate runs it: onnxruntime's QDQ propagation rewrites FP8 Q/DQ into unsupported ops).
2. TensorRT builds the graph TensorRT parses (``unidg.export.tensorrt_graphs``: key-only mask, fp32 Resize, ...,
   written into ``--out``) with the bundle's profile and precision mode, runs it on the saved inputs and compares with
   the saved outputs: cosine similarity >= the gate's velocity cosine (0.995) for the step graph and the encoders,
   PSNR >= the gate's final-image PSNR (30 dB) for the VAE decoder's pixels. The step graph's x_next carries x, so its
   cosine is a weaker check than the gate's velocity cosine.

``--run`` executes both (the first needs only onnxruntime; the second TensorRT and a GPU, and is reported as not run
without them). The bundle is only read.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from unidg.export.bf16_emulation import emulated_bf16_file
from unidg.export.engine import EngineRequest, GraphBuild, plan_builds
from unidg.export.quantize_accuracy import DEFAULT_MIN_COSINE, DEFAULT_MIN_PSNR
from unidg.export.trtexec import check_out_folder
from unidg.runtime.bundle import GRAPH_NAMES, GRAPH_OUTPUTS, Bundle, load_bundle

POLYGRAPHY = "polygraphy"
# polygraphy's console script, run by this Python (the one unidg is installed in).
POLYGRAPHY_CLI = (sys.executable, "-c", "import sys; from polygraphy.tools import main; sys.exit(main())")
SEED = 1
# The gate's figure each graph's output is compared with.
COMPARISONS = {
    "step": ("cosine_similarity", DEFAULT_MIN_COSINE),
    "vae_encoder": ("cosine_similarity", DEFAULT_MIN_COSINE),
    "vae_decoder": ("psnr", DEFAULT_MIN_PSNR),
    "image_encoder": ("cosine_similarity", DEFAULT_MIN_COSINE),
}
_THRESHOLD_OPTION = {"cosine_similarity": "--cosine-similarity-threshold", "psnr": "--psnr-threshold"}


@dataclass(frozen=True)
class GraphCheck:
    graph: str
    onnxruntime: list[str]  # polygraphy run on onnxruntime (saves inputs and outputs)
    tensorrt: list[str]  # polygraphy run on TensorRT, compared with the saved outputs


def _bf16_graphs(bundle: Bundle) -> bool:
    quantization = bundle.metadata.get("quantization") or {}
    return bundle.precision == "bf16" or quantization.get("high_precision") == "bf16"


def _shapes(build: GraphBuild, index: int) -> list[str]:
    return [f"{name}:[{','.join(str(d) for d in corners[index])}]" for name, corners in build.profile.shapes.items()]


def onnxruntime_command(bundle: Bundle, build: GraphBuild, graph_file: Path, out: Path) -> list[str]:
    args = [POLYGRAPHY, "run", str(graph_file), "--onnxrt", "--providers", "cpu"]
    if bundle.precision == "fp8" and build.graph == "step":
        args += ["--graph-optimization-level", "ORT_DISABLE_ALL"]
    if not build.profile.static:
        args += ["--input-shapes", *_shapes(build, 1)]
    args += ["--seed", str(SEED), "--save-inputs", str(out / f"{build.graph}.inputs.json")]
    args += ["--save-outputs", str(out / f"{build.graph}.onnxruntime.json")]
    return args


def tensorrt_command(build: GraphBuild, out: Path) -> list[str]:
    args = [POLYGRAPHY, "run", str(build.onnx), "--trt"]
    if build.strongly_typed:
        args.append("--strongly-typed")
    args += [f"--{flag.lower()}" for flag in build.builder_flags if flag in ("BF16", "FP16")]
    if not build.profile.static:
        for index, option in enumerate(("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes")):
            args += [option, *_shapes(build, index)]
    args += ["--load-inputs", str(out / f"{build.graph}.inputs.json")]
    args += ["--load-outputs", str(out / f"{build.graph}.onnxruntime.json")]
    compare, threshold = COMPARISONS[build.graph]
    (output,) = GRAPH_OUTPUTS[build.graph]
    args += ["--compare-func", compare, _THRESHOLD_OPTION[compare], f"{output}:{threshold:g}"]
    return args


def check_commands(bundle_path: str | Path, out: str | Path, request: EngineRequest | None = None) -> list[GraphCheck]:
    """Write the graphs both halves run into ``out`` and return the commands (the bundle is only read)."""
    bundle = load_bundle(bundle_path, verify=True)  # the comparison must be of the graphs as exported
    out = check_out_folder(bundle, Path(out))
    out.mkdir(parents=True, exist_ok=True)
    checks = []
    # the four graphs of format 1: the per-graph comparisons and thresholds are defined for them
    for build in plan_builds(bundle, request or EngineRequest(graphs=GRAPH_NAMES), graph_dir=out):
        build.prepare_graph()
        graph_file = bundle.graph_path(build.graph)
        if _bf16_graphs(bundle):
            emulated = out / f"{graph_file.stem}.fp32-emulation.onnx"
            emulated_bf16_file(graph_file, emulated)
            graph_file = emulated
        checks.append(
            GraphCheck(build.graph, onnxruntime_command(bundle, build, graph_file, out), tensorrt_command(build, out))
        )
    return checks


def render(checks: list[GraphCheck]) -> str:
    lines = [
        f"# onnxruntime vs TensorRT per graph (polygraphy); thresholds of the accuracy gate: cosine >= "
        f"{DEFAULT_MIN_COSINE:g}, PSNR >= {DEFAULT_MIN_PSNR:g} dB"
    ]
    for check in checks:
        lines += [f"# {check.graph}", shlex.join(check.onnxruntime), shlex.join(check.tensorrt)]
    return "\n".join(lines) + "\n"


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def run_checks(checks: list[GraphCheck]) -> dict[str, str]:
    """Run the commands (polygraphy's CLI, this Python); {graph: "pass" | "FAIL" | why it did not run}."""
    results = {}
    for check in checks:
        halves = [check.onnxruntime] + ([check.tensorrt] if tensorrt_available() else [])
        verdict = "pass"
        for command in halves:
            done = subprocess.run([*POLYGRAPHY_CLI, *command[1:]], capture_output=True, text=True)
            if done.returncode != 0:
                verdict = "FAIL: " + (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                break
        if verdict == "pass" and not tensorrt_available():
            verdict = "onnxruntime half ran; TensorRT half not run (tensorrt not installed)"
        results[check.graph] = verdict
    return results
