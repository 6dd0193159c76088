"""The graphs TensorRT parses, derived from bf16 and FP8-from-bf16 bundles: the attention rewrites on bf16 graphs,
bf16 Resize computed in fp32, the key-only / full mask forms and the TRT_decomposable attribute. Building them
needs TensorRT and a GPU; everything here is the graph side."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_fixtures import RESOLUTION, bf16_bundle, fp8_bf16_bundle, nano_bundle

from unidg.export.bf16_emulation import emulate_bf16
from unidg.export.plugins.onnx_rewrite import (
    attention_mask_shapes,
    count_attention_nodes,
    count_plugin_nodes,
    rewrite_attention_file,
)
from unidg.export.tensorrt_graphs import (
    DECOMPOSABLE_ATTRIBUTE,
    GraphDerivation,
    cast_resize_to_fp32,
    derive_graph_file,
    rotary_to_elementwise,
    tensorrt_graph_census,
    value_types,
)
from unidg.runtime.bundle import load_bundle

BUNDLES = {"bf16": bf16_bundle, "fp8": lambda: fp8_bf16_bundle()[0]}


def _sequence(bundle) -> int:
    return bundle.context_tokens + (RESOLUTION // 16) * (2 * RESOLUTION // 16)


@pytest.mark.parametrize("precision", list(BUNDLES))
@pytest.mark.parametrize("form", ["key_mask", "plugin"])
def test_attention_rewrite_of_a_bf16_step_graph(tmp_path, precision, form):
    """bf16 tensors are ONNX type 16 to onnx-graphsurgeon (numpy has no bf16): the rewrite must not ask numpy."""
    folder = BUNDLES[precision]()
    bundle = load_bundle(folder, verify=False)
    source = folder / "step.onnx"
    original = onnx.load(str(source), load_external_data=False)
    attentions = count_attention_nodes(original)
    assert attentions >= 2
    target = tmp_path / f"step.{form}.onnx"
    report = rewrite_attention_file(source, target, form=form)
    rewritten = onnx.load(str(target), load_external_data=False)
    sequence = _sequence(bundle)
    if form == "plugin":
        assert report.plugin_nodes_after == attentions == count_plugin_nodes(rewritten)
        assert count_attention_nodes(rewritten) == 0
    else:
        assert report.rewired == attentions
        assert attention_mask_shapes(rewritten) == [[1, 1, 1, sequence]] * attentions
        masks = {n.input[3] for n in rewritten.graph.node if n.op_type == "Attention"}
        original_masks = {n.input[3] for n in original.graph.node if n.op_type == "Attention"}
        types, original_types = value_types(rewritten), value_types(original)
        assert {types[m] for m in masks} == {original_types[m] for m in original_masks}  # mask dtype kept


@pytest.mark.parametrize("precision", list(BUNDLES))
def test_bf16_resize_is_computed_in_fp32_bit_identically(tmp_path, precision):
    folder = BUNDLES[precision]()
    source = folder / "vae_decoder.onnx"
    original = onnx.load(str(source))
    before = tensorrt_graph_census(original)
    assert before["resize"] == ["BFLOAT16->BFLOAT16"] * 3 and before["bf16_resize"] == 3
    cast, count = cast_resize_to_fp32(original)
    assert count == 3
    after = tensorrt_graph_census(cast)
    assert after["resize"] == ["FLOAT->FLOAT"] * 3 and after["bf16_resize"] == 0
    # Nearest resizing moves values: bf16 -> fp32 -> bf16 around it changes no bit (both run as their fp32 emulation).
    latents = np.random.default_rng(0).standard_normal((1, 16, RESOLUTION // 8, RESOLUTION // 4)).astype(np.float32)
    outputs = []
    for model in (original, cast):
        emulated, _ = emulate_bf16(model)
        session = ort.InferenceSession(emulated.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"latents": latents})[0])
    assert np.array_equal(outputs[0], outputs[1])
    census = derive_graph_file(source, tmp_path / "vae_decoder.trt.onnx", GraphDerivation())
    assert census["bf16_resize"] == 0 and census["resize"] == ["FLOAT->FLOAT"] * 3


@pytest.mark.parametrize("mask", ["key", "full"])
def test_mask_forms_and_the_decomposable_attribute(tmp_path, mask):
    folder = bf16_bundle()
    bundle = load_bundle(folder, verify=False)
    sequence = _sequence(bundle)
    target = tmp_path / "step.trt.onnx"
    derivation = GraphDerivation(attention="native", attention_mask=mask, decomposable=True)
    census = derive_graph_file(folder / "step.onnx", target, derivation)
    rows = 1 if mask == "key" else sequence
    attentions = count_attention_nodes(onnx.load(str(folder / "step.onnx"), load_external_data=False))
    assert census["attention_masks"] == [[1, 1, rows, sequence]] * attentions
    assert census["decomposable"] == [1] * attentions
    saved = onnx.load(str(target))
    with pytest.raises(onnx.checker.ValidationError, match=f"Unrecognized attribute: {DECOMPOSABLE_ATTRIBUTE}"):
        onnx.checker.check_model(saved)  # why the file is validated without it
    plain = derive_graph_file(folder / "step.onnx", tmp_path / "plain.onnx", GraphDerivation(attention="native"))
    assert plain["decomposable"] == [None] * attentions


def test_rotary_nodes_become_the_rotation_they_define(tmp_path):
    """A step graph exported with RotaryEmbedding (``--rope op``) reaches TensorRT without it: each node is the
    Mul/Sub/Add rotation it defines, the same outputs in onnxruntime; bf16 graphs likewise."""
    source = nano_bundle() / "step.onnx"
    original = onnx.load(str(source))
    rotary = sum(node.op_type == "RotaryEmbedding" for node in original.graph.node)
    assert rotary == 2 * count_attention_nodes(original)  # Q and K of every attention
    rewritten, count = rotary_to_elementwise(original)
    assert count == rotary and tensorrt_graph_census(rewritten)["rotary_nodes"] == 0
    rng = np.random.default_rng(0)
    sessions = [
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (original, rewritten)
    ]
    feeds = {i.name: rng.standard_normal(i.shape).astype(np.float32) for i in sessions[0].get_inputs()}
    want, got = (session.run(None, feeds)[0] for session in sessions)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
    census = derive_graph_file(source, tmp_path / "step.native.onnx", GraphDerivation(attention="native"))
    assert census["rotary_nodes"] == 0
    assert (
        derive_graph_file(bf16_bundle() / "step.onnx", tmp_path / "bf16.onnx", GraphDerivation())["rotary_nodes"] == 0
    )
    kept = GraphDerivation(attention="native", elementwise_rope=False)
    assert derive_graph_file(source, tmp_path / "kept.onnx", kept)["rotary_nodes"] == rotary


def test_the_derived_graph_never_replaces_its_source(tmp_path):
    folder = bf16_bundle()
    with pytest.raises(ValueError, match="another file than its source"):
        derive_graph_file(folder / "vae_decoder.onnx", folder / "vae_decoder.onnx", GraphDerivation())


def _sha256_tree(folder) -> dict[str, str]:
    from unidg.core.manifest import sha256_file

    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _trtexec_log(version: str, device: str, capability: str, profile: dict | None, passed: bool = True) -> str:
    """The lines of a trtexec build log that adopt reads, in the form trtexec prints them."""
    lines = ["&&&& RUNNING TensorRT.trtexec [TensorRT v101500] [b29] # trtexec --onnx=..."]
    if profile is None:
        lines.append("[12/07/2026-10:00:00] [I] Input build shapes: model")
    else:
        for name, corners in profile.items():
            shape = "+".join("x".join(str(d) for d in corner) for corner in corners)
            lines.append(f"[12/07/2026-10:00:00] [I] Input build shape (profile 0): {name}={shape}")
    lines += [
        "[12/07/2026-10:00:00] [I] === Device Information ===",
        f"[12/07/2026-10:00:00] [I] Selected Device: {device}",
        f"[12/07/2026-10:00:00] [I] Compute Capability: {capability}",
        f"[12/07/2026-10:00:00] [I] TensorRT version: {version}",
    ]
    if passed:
        lines.append("&&&& PASSED TensorRT.trtexec [TensorRT v101500] [b29] # trtexec --onnx=...")
    return "\n".join(lines) + "\n"


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="tensorrt installed: stand-in plans refused"
)
def test_trtexec_writes_to_out_and_adopt_makes_a_bundle_the_runtime_accepts(tmp_path, capsys):
    """The README's FP8 bundle (from bf16): `unidg export trtexec` leaves it byte-identical (sha256 of every file) and
    writes the TensorRT graphs (no bf16 Resize, key-only masks) beside trtexec.json; `unidg export adopt` hashes the
    built plans into a new bundle whose engines table the TensorRT backend parses and checks.

    No TensorRT here: the plan files are stand-in bytes (adopt hashes them; it does not read them without TensorRT)
    and the logs hold the lines trtexec prints; the plans are not deserialized (tensorrt not installed)."""
    from unidg.cli import main
    from unidg.runtime.backends.tensorrt_engines import (
        EngineMismatchError,
        check_engine_compatibility,
        parse_engines,
    )
    from unidg.runtime.bundle import GRAPH_NAMES

    source, _ = fp8_bf16_bundle()
    before = _sha256_tree(source)
    out = tmp_path / "trt"
    assert main(["export", "trtexec", "--bundle", str(source), "--out", str(out)]) == 0
    script = capsys.readouterr().out
    assert _sha256_tree(source) == before  # nothing written, nothing changed
    assert (out / "trtexec.sh").read_text() in script and "(TensorRT 10 trtexec)" in script  # (+ library warnings)
    description = json.loads((out / "trtexec.json").read_text())
    census = description["census"]
    assert census["vae_decoder"]["resize"] == ["FLOAT->FLOAT"] * 3
    assert all(figures["bf16_resize"] == 0 for figures in census.values())
    step_masks = census["step"]["attention_masks"]
    assert step_masks and all(shape[1:3] == [1, 1] for shape in step_masks)
    assert description["plans"]["step"]["onnx"] == "step.native.onnx" and (out / "step.native.onnx").is_file()
    assert description["plans"]["vae_encoder"]["onnx"] == "vae_encoder.onnx"  # unchanged: the bundle's own

    for graph in GRAPH_NAMES:
        entry = description["plans"][graph]
        (out / entry["file"]).write_bytes(f"stand-in for the {graph} plan trtexec writes".encode())
        (out / entry["log"]).write_text(_trtexec_log("10.15.1", "NVIDIA H100 80GB HBM3", "9.0", entry["profile"]))
    plans_before = _sha256_tree(out)
    adopted = tmp_path / "bundle-fp8-trt"
    assert main(["export", "adopt", "--bundle", str(source), "--plans", str(out), "--out", str(adopted)]) == 0
    assert "4 plans of TensorRT 10.15.1 for NVIDIA H100 80GB HBM3 (compute capability 9.0)" in capsys.readouterr().out
    assert _sha256_tree(source) == before and _sha256_tree(out) == plans_before
    bundle = load_bundle(adopted)  # every file's sha256 checked, plans and step.native.onnx included
    assert {"engines/step.plan", "step.native.onnx", "vae_decoder.trt.onnx"} <= set(bundle.files)
    specs = parse_engines(bundle)
    assert specs["step"].onnx == "step.native.onnx" and specs["step"].compute_capability == (9, 0)
    check_engine_compatibility(specs["step"], "10.15.1.29", (9, 0))
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.15.1"):
        check_engine_compatibility(specs["step"], "11.0.0", (9, 0))
    # With TensorRT importable adopt also deserializes each plan (stand-in bytes would then be refused).
    assert bundle.engines["checked_by_deserializing"] is False

    # Refusals: a failed build, shapes other than recorded, an older TensorRT, another bundle.
    step = description["plans"]["step"]
    wrong = {name: [[2, *corner[1:]] for corner in corners] for name, corners in list(step["profile"].items())[:1]}
    cases = [
        (_trtexec_log("10.15.1", "NVIDIA H100 80GB HBM3", "9.0", step["profile"], passed=False), "does not say"),
        (_trtexec_log("10.15.1", "NVIDIA H100 80GB HBM3", "9.0", wrong), "was built with input shapes"),
        (_trtexec_log("10.13.0", "NVIDIA H100 80GB HBM3", "9.0", step["profile"]), "need TensorRT >= 10.15"),
        (_trtexec_log("10.15.1", "NVIDIA H200", "9.0", step["profile"]), "different TensorRT versions or GPUs"),
    ]
    for log, message in cases:
        (out / step["log"]).write_text(log)
        assert (
            main(["export", "adopt", "--bundle", str(source), "--plans", str(out), "--out", str(tmp_path / "x")]) == 2
        )
        assert message in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert (
        main(["export", "adopt", "--bundle", str(bf16_bundle()), "--plans", str(out), "--out", str(tmp_path / "x")])
        == 2
    )
    assert "was written for bundle" in capsys.readouterr().err


def test_check_prints_polygraphy_comparisons_with_the_gate_thresholds(tmp_path, capsys):
    """Two `polygraphy run` commands per graph: onnxruntime (the bf16 graphs as their fp32 emulation, the FP8 step
    with graph optimizations off) saves inputs and outputs; TensorRT runs the TensorRT graph on them and compares
    with cosine >= 0.995 (PSNR >= 30 dB for the decoder). The onnxruntime half of one graph is run here for real."""
    import shlex

    from unidg.cli import main
    from unidg.export.check import GraphCheck, run_checks
    from unidg.export.quantize_accuracy import DEFAULT_MIN_COSINE, DEFAULT_MIN_PSNR

    source, _ = fp8_bf16_bundle()
    before = _sha256_tree(source)
    out = tmp_path / "check"
    assert main(["export", "check", "--bundle", str(source), "--out", str(out)]) == 0
    commands = [shlex.split(line) for line in capsys.readouterr().out.splitlines() if line.startswith("polygraphy")]
    assert _sha256_tree(source) == before and len(commands) == 8
    by_graph = {}
    for onnxruntime, tensorrt in zip(commands[::2], commands[1::2]):
        graph = Path(onnxruntime[2]).name.split(".")[0]
        by_graph[graph] = (onnxruntime, tensorrt)
        assert onnxruntime[:2] == ["polygraphy", "run"] and "--onnxrt" in onnxruntime
        assert Path(onnxruntime[2]).name == f"{graph}.fp32-emulation.onnx" and Path(onnxruntime[2]).is_file()
        saved = onnxruntime[onnxruntime.index("--save-outputs") + 1]
        assert tensorrt[tensorrt.index("--load-outputs") + 1] == saved
        assert "--trt" in tensorrt and "--strongly-typed" in tensorrt and Path(tensorrt[2]).is_file()
    assert set(by_graph) == {"step", "vae_encoder", "vae_decoder", "image_encoder"}
    step_ort, step_trt = by_graph["step"]
    assert step_ort[step_ort.index("--graph-optimization-level") + 1] == "ORT_DISABLE_ALL"
    assert Path(step_trt[2]).name == "step.native.onnx"
    assert step_trt[-4:] == ["--compare-func", "cosine_similarity", "--cosine-similarity-threshold", "x_next:0.995"]
    assert f"x_next:{DEFAULT_MIN_COSINE:g}" == step_trt[-1]
    assert by_graph["vae_decoder"][1][-4:] == [
        "--compare-func",
        "psnr",
        "--psnr-threshold",
        f"pixels:{DEFAULT_MIN_PSNR:g}",
    ]
    assert Path(by_graph["vae_decoder"][1][2]).name == "vae_decoder.trt.onnx"

    verdict = run_checks([GraphCheck("vae_encoder", *by_graph["vae_encoder"])])["vae_encoder"]
    assert verdict == "onnxruntime half ran; TensorRT half not run (tensorrt not installed)" or verdict == "pass"
    from polygraphy.comparator import RunResults

    results = RunResults.load(str(out / "vae_encoder.onnxruntime.json"))
    ((_, iterations),) = list(results.items())
    assert iterations[0]["latents"].shape == (1, 16, RESOLUTION // 8, RESOLUTION // 4)
