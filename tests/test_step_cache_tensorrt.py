"""Step caching on the TensorRT backend (docs/step-cache.md): the build plans, profiles, derived graphs and trtexec
commands of the step-cache graphs, the engines table the runtime reads, the binding shapes, and the refusals when a
plan is missing. TensorRT cannot be installed here: the test that builds and runs the plans skips naming that.

The bundle: the shipped UniDG-nano bundle (format 2, step-cache graphs, a gated static schedule); it is only read.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest

import unidg.runtime.demo as demo
from unidg.export.engine import EngineError, EngineRequest, engine_entry, engines_table, plan_builds
from unidg.export.plugins.onnx_rewrite import attention_mask_shapes
from unidg.export.trtexec import render
from unidg.runtime.backends import BackendError
from unidg.runtime.backends.tensorrt_engines import binding_shapes, parse_engines, tensorrt_step_cache_problem
from unidg.runtime.bundle import CACHE_GRAPH_INPUTS, CACHE_GRAPH_NAMES, GRAPH_NAMES, bundle_shapes, load_bundle

SHIPPED = demo.DEFAULT_BUNDLE
ALL = (*GRAPH_NAMES, *CACHE_GRAPH_NAMES)


def _shipped():
    return load_bundle(SHIPPED, verify=False)


def _with_plans(bundle, graphs=ALL, request: EngineRequest | None = None):
    """``bundle`` as the runtime sees it after `unidg export engine` built plans for ``graphs`` (placeholder hashes:
    the runtime's table reader checks that each plan and its derived graph are listed, not what they hold)."""
    request = request or EngineRequest(trtexec_major=10)
    builds = [b for b in plan_builds(bundle, request) if b.graph in graphs]
    plans = {b.graph: engine_entry(b, "0" * 64, 1.0) for b in builds}
    table = engines_table(plans, "10.15.1.29", (9, 0), "NVIDIA H100 80GB HBM3", request)
    listed = {name: "0" * 64 for b in builds for name in (b.plan, b.onnx.name)}  # plans and derived graphs
    return dataclasses.replace(bundle, engines=table, files={**listed, **bundle.files})


# ------------------------------------------------------------------------------------------------ building the plans
def test_a_bundle_with_cache_graphs_plans_every_graph_by_default():
    bundle = _shipped()
    builds = {b.graph: b for b in plan_builds(bundle, EngineRequest(trtexec_major=10))}
    assert tuple(builds) == ALL
    assert {g: builds[g].plan for g in CACHE_GRAPH_NAMES} == {g: f"engines/{g}.plan" for g in CACHE_GRAPH_NAMES}
    # the graphs that hold transformer blocks take the step's attention form; the cached step has no attention
    assert [builds[g].attention for g in ("step", "step_head", "step_tail", "step_cached")] == [
        "native",
        "native",
        "native",
        None,
    ]
    assert engine_entry(builds["step_tail"], "0" * 64, 1.0)["attention_mask"] == "key"
    n, c, d = bundle.image_tokens, bundle.context_tokens, bundle.step_cache["hidden_dim"]
    want = bundle_shapes(bundle.metadata, 1)
    for graph in CACHE_GRAPH_NAMES:
        profile = builds[graph].profile
        assert profile.static and tuple(profile.shapes) == CACHE_GRAPH_INPUTS[graph]
        assert all(corners == (want[graph][name],) * 3 for name, corners in profile.shapes.items())
    assert builds["step_tail"].profile.shapes["hidden"][0] == (1, n, d)
    assert builds["step_tail"].profile.shapes["encoder_hidden"][0] == (1, c, d)
    assert builds["step_cached"].profile.shapes["temb"][0] == (1, d)
    assert [b.graph for b in plan_builds(bundle, EngineRequest(graphs=("step", "step_cached")))] == [
        "step",
        "step_cached",
    ]


def test_head_and_tail_are_derived_with_the_key_only_mask(tmp_path):
    bundle = _shipped()
    builds = {b.graph: b for b in plan_builds(bundle, EngineRequest(trtexec_major=10), graph_dir=tmp_path)}
    keys = bundle.context_tokens + bundle.image_tokens
    for graph in ("step_head", "step_tail"):
        original = attention_mask_shapes(onnx.load(str(bundle.graph_path(graph)), load_external_data=False))
        census = builds[graph].prepare_graph()
        assert original and all(shape == [1, 1, keys, keys] for shape in original)  # the bundle's expanded mask
        assert census["attention_masks"] == [[1, 1, 1, keys]] * len(original)
        assert builds[graph].onnx == tmp_path / f"{graph}.native.onnx" and builds[graph].onnx.is_file()
    assert builds["step_cached"].prepare_graph() is None  # parsed as the bundle has it
    assert not any(p.name.endswith(".native.onnx") for p in SHIPPED.iterdir())  # the bundle is only read


def test_cache_graphs_asked_of_a_bundle_without_them_are_refused():
    plain = dataclasses.replace(_shipped(), cache_graphs={})
    assert tuple(b.graph for b in plan_builds(plain, EngineRequest(trtexec_major=10))) == GRAPH_NAMES
    with pytest.raises(EngineError, match="--graphs step_tail: bundle .* has no step-cache graphs"):
        plan_builds(plain, EngineRequest(graphs=("step", "step_tail")))
    with pytest.raises(EngineError, match="unknown graphs"):
        EngineRequest(graphs=("step_middle",))


def test_trtexec_script_builds_and_profiles_the_cache_graphs(tmp_path):
    out = tmp_path / "trtexec"
    text = render(SHIPPED, EngineRequest(trtexec_major=10), out)
    assert text.count("--saveEngine=") == len(ALL) and text.count("--loadEngine=") == len(ALL)
    for graph in CACHE_GRAPH_NAMES:
        assert f"--saveEngine={out / 'engines' / f'{graph}.plan'}" in text
    assert (out / "step_head.native.onnx").is_file() and (out / "step_tail.native.onnx").is_file()


def test_export_check_compares_the_four_graphs_it_has_thresholds_for(tmp_path):
    from unidg.export.check import check_commands

    assert tuple(check.graph for check in check_commands(SHIPPED, tmp_path / "check")) == GRAPH_NAMES


# ------------------------------------------------------------------------------------------------- the runtime side
def test_the_runtime_reads_the_cache_plans_and_their_binding_shapes():
    bundle = _with_plans(_shipped())
    specs = parse_engines(bundle)
    assert tuple(specs) == ALL and specs["step_head"].file == "engines/step_head.plan"
    assert tensorrt_step_cache_problem(bundle, set(specs)) is None
    n, d = bundle.image_tokens, bundle.step_cache["hidden_dim"]
    shapes = binding_shapes(bundle, "step_tail", 1)
    assert shapes["hidden"] == (1, n, d) and shapes["tail_residual"] == (1, n, d) and shapes["x_next"] == (1, n, 64)
    assert binding_shapes(bundle, "step_head", 1)["first_residual"] == (1, n, d)
    assert binding_shapes(bundle, "step_cached", 1)["temb"] == (1, d)


def test_missing_cache_plans_or_a_captured_loop_decline_step_caching_by_name():
    four = _with_plans(_shipped(), GRAPH_NAMES)
    problem = tensorrt_step_cache_problem(four, set(parse_engines(four)))
    assert "no TensorRT plans for the step-cache graphs ['step_head', 'step_tail', 'step_cached']" in problem
    assert f"unidg export engine --bundle {four.path}" in problem
    no_cached = _with_plans(_shipped(), ALL[:-1])
    assert "['step_cached']" in tensorrt_step_cache_problem(no_cached, set(parse_engines(no_cached)))
    full = _with_plans(_shipped())
    assert "--cuda-graph captures the uncached loop only" in tensorrt_step_cache_problem(full, set(ALL), True)
    plain = dataclasses.replace(full, cache_graphs={})
    assert "no step-cache graphs" in tensorrt_step_cache_problem(plain, set(ALL))
    with pytest.raises(BackendError, match=r"plans for \['step_head', 'step_tail', 'step_cached'\] but the bundle"):
        parse_engines(plain)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="tensorrt installed: stand-in plans refused"
)
def test_adopt_takes_the_cache_plans_along(tmp_path, capsys):
    """`unidg export trtexec` then `unidg export adopt` (stand-in plan bytes and the log lines trtexec prints, as in
    tests/test_tensorrt_graphs.py; nothing is deserialized without TensorRT): the adopted bundle lists all seven."""
    from test_tensorrt_graphs import _trtexec_log

    from unidg.cli import main

    out = tmp_path / "trt"
    assert main(["export", "trtexec", "--bundle", str(SHIPPED), "--out", str(out)]) == 0
    description = json.loads((out / "trtexec.json").read_text())
    assert tuple(description["plans"]) == ALL
    for graph, entry in description["plans"].items():
        (out / entry["file"]).write_bytes(f"stand-in for the {graph} plan trtexec writes".encode())
        (out / entry["log"]).write_text(_trtexec_log("10.15.1", "NVIDIA H100 80GB HBM3", "9.0", entry["profile"]))
    adopted = tmp_path / "adopted"
    assert main(["export", "adopt", "--bundle", str(SHIPPED), "--plans", str(out), "--out", str(adopted)]) == 0
    bundle = load_bundle(adopted)  # every file's sha256 checked, the cache plans and derived graphs included
    specs = parse_engines(bundle)
    assert tuple(specs) == ALL and specs["step_tail"].onnx == "step_tail.native.onnx"
    assert tensorrt_step_cache_problem(bundle, set(specs)) is None


# ------------------------------------------------------------------------------------------------------ TensorRT
def test_cached_engines_match_onnxruntime(tmp_path):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt not installed")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for TensorRT")
    from unidg.export.engine import build_engines
    from unidg.runtime.step_cache import StepCacheError
    from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest

    folder = tmp_path / "bundle"
    shutil.copytree(SHIPPED, folder)
    build_engines(folder, EngineRequest(), progress=None)
    case = demo.read_samples(demo.DEFAULT_SAMPLES)[0]
    request = SynthesisRequest.from_files(case.reference, case.reference_mask, case.source, case.mask, seed=5)
    for cache in ("static", "dynamic"):
        with DefectSynthesizer.from_bundle(folder, cache=cache, threads=1) as reference:
            want = reference.generate(request)
        with DefectSynthesizer.from_bundle(folder, "tensorrt", cache=cache) as synth:
            got = synth.generate(request)
        assert got.metadata["step_cache"]["mode"] == cache and got.metadata["step_cache"]["full_steps"] < 28
        assert np.abs(got.diptych.astype(int) - want.diptych.astype(int)).max() <= 2
    with pytest.raises(StepCacheError, match="--cuda-graph captures the uncached loop only"):
        DefectSynthesizer.from_bundle(folder, "tensorrt", cache="static", cuda_graph=True)
