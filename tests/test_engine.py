"""`unidg export engine` / `unidg export trtexec`: everything around the TensorRT calls (precision modes, optimization
profiles from the manifest, plan flags, the engines table the runtime reads, trtexec commands). The builds themselves
need TensorRT and a GPU and are skipped without them."""

from __future__ import annotations

import dataclasses
import importlib.util
import shlex

import pytest
from export_fixtures import RESOLUTION, nano_bundle

from unidg.cli import main
from unidg.export.engine import (
    EngineError,
    EngineRequest,
    engines_table,
    plan_builds,
    precision_mode,
    profile_for,
)
from unidg.export.trtexec import build_command, builder_flags_of, profile_command, render
from unidg.runtime.bundle import GRAPH_NAMES, load_bundle

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _static():
    return load_bundle(nano_bundle(), verify=False)


@pytest.fixture()
def bundle_copy(tmp_path):
    """A copy of the nano bundle: printing trtexec commands writes the TensorRT step graph into the bundle."""
    import shutil

    shutil.copytree(nano_bundle(), tmp_path / "bundle")
    return tmp_path / "bundle"


def _dynamic(sequence: bool = True, precision: str = "fp32"):
    """The nano bundle's manifest as a dynamic-batch (and dynamic-sequence) bundle would record it."""
    bundle = _static()
    meta = {**bundle.metadata, "batch": "dynamic", "max_batch": 8, "precision": precision}
    meta["sequence"] = "dynamic" if sequence else "static"
    return dataclasses.replace(bundle, batch=None, metadata=meta)


def _tokens(s: int) -> int:
    return (s // 16) * (2 * s // 16)


def test_static_profile_is_the_manifest_shape():
    bundle = _static()
    profile = profile_for(bundle, "step", EngineRequest())
    assert profile.static and profile.batch == (1, 1) and profile.resolution == (RESOLUTION, RESOLUTION)
    c, n = bundle.context_tokens, _tokens(RESOLUTION)
    assert profile.shapes["x"] == ((1, n, 64),) * 3
    assert profile.shapes["key_bias"] == ((1, c + n),) * 3
    assert profile.shapes["txt_ids"] == ((c, 3),) * 3
    decoder = profile_for(bundle, "vae_decoder", EngineRequest()).shapes["latents"]
    assert decoder[0] == (1, 16, RESOLUTION // 8, RESOLUTION // 4)


def test_dynamic_profiles_span_batch_and_resolution():
    bundle = _dynamic()
    request = EngineRequest(opt_batch=2, max_batch=4, min_resolution=32, max_resolution=128)
    step = profile_for(bundle, "step", request)
    c = bundle.context_tokens
    assert step.batch == (1, 4) and step.resolution == (32, 128)
    assert step.shapes["x"] == ((1, _tokens(32), 64), (2, _tokens(64), 64), (4, _tokens(128), 64))
    assert step.shapes["key_bias"][2] == (4, c + _tokens(128))
    assert step.shapes["img_ids"] == ((_tokens(32), 3), (_tokens(64), 3), (_tokens(128), 3))
    encoder = profile_for(bundle, "vae_encoder", request).shapes["pixels"]
    assert encoder == ((1, 3, 32, 64), (2, 3, 64, 128), (4, 3, 128, 256))
    image = profile_for(bundle, "image_encoder", request).shapes["pixels"]
    p = bundle.reference_size
    assert image == ((1, 3, p, p), (2, 3, p, p), (4, 3, p, p))  # the reference size never varies
    static = profile_for(
        bundle, "step", dataclasses.replace(request, dynamic=False, min_resolution=None, max_resolution=None)
    )
    assert static.static


def test_profile_refusals():
    with pytest.raises(EngineError, match="--dynamic: bundle .* is static"):
        profile_for(_static(), "step", EngineRequest(dynamic=True))
    with pytest.raises(EngineError, match="static at S=64"):
        profile_for(_static(), "step", EngineRequest(max_resolution=128))
    with pytest.raises(EngineError, match="exceeds the bundle's exported batch bound 8"):
        profile_for(_dynamic(), "step", EngineRequest(max_batch=16))
    with pytest.raises(EngineError, match="must contain the bundle's resolution 64"):
        profile_for(_dynamic(), "step", EngineRequest(min_resolution=96, max_resolution=128))
    with pytest.raises(EngineError, match="multiple of 16"):
        profile_for(_dynamic(), "step", EngineRequest(max_resolution=100))


def test_precision_modes():
    assert precision_mode(_static(), None) == (True, ())  # fp32 graph, strongly typed
    assert precision_mode(_static(), "bf16") == (False, ("BF16",))  # TensorRT picks bf16 kernels
    for fmt in ("fp8", "int8"):
        assert precision_mode(_dynamic(precision=fmt), fmt) == (True, ())  # Q/DQ: strongly typed, no flags
        with pytest.raises(EngineError, match=f"--{fmt} needs a bundle with {fmt.upper()} Q/DQ"):
            precision_mode(_static(), fmt)
    with pytest.raises(EngineError, match="already fix their precision"):
        precision_mode(_dynamic(precision="fp8"), "bf16")


def test_plan_flags_and_engines_table_match_the_runtime_reader():
    from unidg.runtime.backends.tensorrt_engines import parse_engines

    request = EngineRequest(strip_weights=True, version_compatible=True, hardware_compatibility="ampere_plus")
    bundle = _dynamic()
    builds = plan_builds(bundle, request)
    assert [b.graph for b in builds] == list(GRAPH_NAMES)
    assert set(builds[0].builder_flags) == {"STRIP_PLAN", "REFIT_IDENTICAL", "VERSION_COMPATIBLE"}
    plans = {b.graph: {"file": b.plan, "sha256": "0" * 64, "batch": list(b.profile.batch)} for b in builds}
    table = engines_table(plans, "10.13.0.35", (9, 0), "NVIDIA H100", request)
    listed = dataclasses.replace(bundle, engines=table, files={**bundle.files, **{b.plan: "0" * 64 for b in builds}})
    specs = parse_engines(listed)
    assert specs["step"].compute_capability == (9, 0) and specs["step"].batch == (1, 8)
    assert specs["step"].version_compatible and specs["step"].hardware_compatibility == "ampere_plus"


def test_trtexec_commands(bundle_copy):
    bundle = _dynamic()
    request = EngineRequest(precision="bf16", max_batch=4, timing_cache="cache.bin", trtexec_major=10)
    build = plan_builds(bundle, request)[0]
    command = build_command(build, bundle.path)
    n = _tokens(RESOLUTION)
    assert command[:2] == ["trtexec", f"--onnx={bundle.path / 'step.native.onnx'}"]
    assert "--bf16" in command and "--stronglyTyped" not in command
    assert f"--saveEngine={bundle.path / 'engines/step.plan'}" in command
    assert "--timingCacheFile=cache.bin" in command and "--builderOptimizationLevel=3" in command
    shapes = {arg.split("=")[0]: arg.split("=", 1)[1] for arg in command if "Shapes=" in arg}
    assert shapes["--optShapes"].startswith(f"x:1x{n}x64,cond:1x{n}x320,")
    assert f"x:4x{n}x64" in shapes["--maxShapes"]
    profile = profile_command(build, bundle.path)
    assert {"--useCudaGraph", "--separateProfileRun", "--dumpProfile"} <= set(profile)
    assert f"--shapes=x:1x{n}x64" in " ".join(profile)
    static = plan_builds(_static(), EngineRequest(trtexec_major=10))[0]
    assert "--stronglyTyped" in build_command(static, _static().path)
    assert not any("Shapes" in a for a in build_command(static, _static().path))
    out = bundle_copy.parent / "trtexec"
    text = render(bundle_copy, EngineRequest(), out)
    assert "# wrote step.native.onnx" in text and (out / "step.native.onnx").is_file()
    assert not (bundle_copy / "step.native.onnx").exists()  # the bundle is only read
    for line in text.splitlines():
        if line.startswith("trtexec"):
            assert shlex.split(line)[0] == "trtexec"
    assert text.count("--loadEngine=") == 4 and text.count("--saveEngine=") == 4


def test_profiling_verbosity_is_a_build_option():
    """--profilingVerbosity decides what layer information the plan keeps: it belongs on the build command."""
    bundle = _static()
    for major in (10, 11):
        build = plan_builds(bundle, EngineRequest(trtexec_major=major))[0]
        assert "--profilingVerbosity=detailed" in build_command(build, bundle.path)
        layer_info = {"--dumpLayerInfo", f"--exportLayerInfo={bundle.path / 'engines/step.plan'}.layers.json"}
        assert layer_info <= set(build_command(build, bundle.path))  # which kernel each layer got
        assert not any(arg.startswith("--profilingVerbosity") for arg in profile_command(build, bundle.path))


def test_trtexec_dialect_of_tensorrt_11():
    """TensorRT 11 builds strongly typed only: no --stronglyTyped, no precision flags, no no-op profiling options."""
    bundle = _static()
    build = plan_builds(bundle, EngineRequest(trtexec_major=11))[0]
    assert build.options.trtexec_major == 11
    command, profile = build_command(build, bundle.path), profile_command(build, bundle.path)
    removed = {"--stronglyTyped", "--bf16", "--fp16", "--useCudaGraph", "--separateProfileRun", "--noDataTransfers"}
    assert not removed & (set(command) | set(profile))
    assert {"--dumpProfile", f"--exportProfile={bundle.path / 'engines/step.plan'}.profile.json"} <= set(profile)
    weak = plan_builds(bundle, EngineRequest(precision="bf16", trtexec_major=11))[0]
    with pytest.raises(EngineError, match="TensorRT 11 builds strongly typed only.*--tensorrt-major 10"):
        build_command(weak, bundle.path)
    with pytest.raises(EngineError, match="--tensorrt-major 9"):
        EngineRequest(trtexec_major=9)


@pytest.mark.parametrize("refit, strip", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("major", [10, 11])
def test_refit_and_strip_flags_agree_between_python_and_trtexec(refit, strip, major):
    """The flags `unidg export engine` sets equal those trtexec sets for the printed command; a stripped plan is
    refit-identical (STRIP_PLAN + REFIT_IDENTICAL, no REFIT) unless --refit asks for changeable weights."""
    bundle = _static()
    request = EngineRequest(refit=refit, strip_weights=strip, version_compatible=True, trtexec_major=major)
    for build in plan_builds(bundle, request):
        assert builder_flags_of(build_command(build, bundle.path)) == set(build.builder_flags)
    flags = set(plan_builds(bundle, request)[0].builder_flags) - {"VERSION_COMPATIBLE"}
    expected = {(False, False): set(), (True, False): {"REFIT"}, (False, True): {"STRIP_PLAN", "REFIT_IDENTICAL"}}
    expected[(True, True)] = {"REFIT", "STRIP_PLAN"}
    assert flags == expected[(refit, strip)]


def _plugin_bundle(precision: str = "fp32"):
    bundle = _static()
    return dataclasses.replace(bundle, metadata={**bundle.metadata, "attention": "plugin", "precision": precision})


def test_plugin_tactics_limited_to_48_kib_unless_asked():
    step = plan_builds(_plugin_bundle(), EngineRequest(graphs=("step",)))[0]
    assert step.uses_plugin and step.plugin_max_shared_bytes == 48 * 1024
    lifted = plan_builds(_plugin_bundle(), EngineRequest(graphs=("step",), plugin_large_shared_memory=True))[0]
    assert lifted.plugin_max_shared_bytes is None
    assert plan_builds(_static(), EngineRequest(graphs=("step",)))[0].plugin_max_shared_bytes is None  # no plugin


def test_cli_plugin_shared_memory_option(capsys, tmp_path):
    import shutil

    from runtime_fixtures import rewrite_manifest

    bundle = tmp_path / "bundle"
    shutil.copytree(nano_bundle(), bundle)
    rewrite_manifest(bundle, lambda meta: meta.update(attention="plugin"))
    out = str(tmp_path / "trtexec")
    assert main(["export", "trtexec", "--bundle", str(bundle), "--out", out]) == 0
    text = capsys.readouterr().out
    assert "limited to 48 KiB" in text and f"unidg export engine --bundle {bundle} --graphs step`" in text
    assert main(["export", "trtexec", "--bundle", str(bundle), "--out", out, "--plugin-large-shared-memory"]) == 0
    assert "--graphs step --plugin-large-shared-memory`" in capsys.readouterr().out


def test_hardware_compatible_plans_refused_for_plugin_and_fp8():
    ampere = EngineRequest(hardware_compatibility="ampere_plus")
    with pytest.raises(EngineError, match="ampere_plus with the attention plugin"):
        plan_builds(_plugin_bundle(), ampere)
    with pytest.raises(EngineError, match="FP8 kernels need sm_89"):
        plan_builds(_dynamic(precision="fp8"), ampere)
    # same compute capability keeps the plugin's SM; a plain fp32 bundle may be Ampere-compatible
    plan_builds(_plugin_bundle(), EngineRequest(hardware_compatibility="same_compute_capability"))
    plan_builds(_static(), ampere)


def test_plan_entries_say_which_plans_embed_the_plugin():
    from unidg.export.engine import engine_entry

    builds = plan_builds(_plugin_bundle(), EngineRequest())
    entries = {b.graph: engine_entry(b, "0" * 64, 1.0) for b in builds}
    assert entries["step"]["plugin"] is True and entries["vae_decoder"]["plugin"] is False


def test_cli_trtexec_and_refusals(capsys, bundle_copy):
    out = str(bundle_copy.parent / "trtexec")
    assert main(["export", "trtexec", "--bundle", str(bundle_copy), "--out", out, "--fp8"]) == 2
    assert "--fp8 needs a bundle with FP8 Q/DQ" in capsys.readouterr().err
    assert main(["export", "trtexec", "--bundle", str(bundle_copy), "--out", out, "--tensorrt-major", "11"]) == 0
    assert "--stronglyTyped" not in capsys.readouterr().out
    assert main(["export", "trtexec", "--bundle", str(bundle_copy), "--out", str(bundle_copy / "trt")]) == 2
    assert "is inside the bundle" in capsys.readouterr().err


def test_trtexec_dialect_follows_the_installed_tensorrt(monkeypatch):
    """Named: that dialect; else the installed TensorRT's major; else 10, the oldest the [tensorrt] extra allows
    (tensorrt>=10.15), whose commands TensorRT 11's trtexec still takes."""
    import importlib.metadata

    from unidg.export import engine

    assert EngineRequest(trtexec_major=11).trtexec_major == 11
    versions = {"tensorrt": "11.1.0.7"}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(engine.importlib.metadata, "version", version)
    assert EngineRequest().trtexec_major == 11
    versions["tensorrt"] = "10.15.1.29"
    assert EngineRequest().trtexec_major == 10
    versions.clear()
    assert EngineRequest().trtexec_major == engine.DEFAULT_TRTEXEC_MAJOR == 10


def test_native_attention_is_the_default_with_a_key_only_mask(bundle_copy):
    """TensorRT builds parse a step graph whose Attention nodes take the [B, 1, 1, S] key mask; the bundle's own
    step.onnx (what onnxruntime runs) keeps the [B, 1, S, S] broadcast and stays byte-for-byte as exported."""
    import onnx

    from unidg.core.manifest import sha256_file
    from unidg.export.plugins.onnx_rewrite import attention_mask_shapes

    bundle = load_bundle(bundle_copy, verify=False)
    before = sha256_file(bundle_copy / "step.onnx")
    step = plan_builds(bundle, EngineRequest(graphs=("step",)))[0]
    assert step.attention == "native" and not step.uses_plugin and step.onnx.name == "step.native.onnx"
    step.prepare_graph()
    sequence = bundle.context_tokens + _tokens(RESOLUTION)
    native = attention_mask_shapes(onnx.load(str(step.onnx), load_external_data=False))
    assert native and all(shape == [1, 1, 1, sequence] for shape in native)
    expanded = attention_mask_shapes(onnx.load(str(bundle_copy / "step.onnx"), load_external_data=False))
    assert all(shape == [1, 1, sequence, sequence] for shape in expanded)
    assert sha256_file(bundle_copy / "step.onnx") == before
    assert f"--onnx={step.onnx}" in build_command(step, bundle.path)


def test_plugin_attention_is_a_build_option(bundle_copy):
    from unidg.export.engine import engine_entry

    bundle = load_bundle(bundle_copy, verify=False)
    step = plan_builds(bundle, EngineRequest(graphs=("step",), attention="plugin"))[0]
    assert step.uses_plugin and step.onnx.name == "step.plugin.onnx" and step.derivation.attention == "plugin"
    assert step.plugin_max_shared_bytes == 48 * 1024
    step.prepare_graph()
    import onnx

    from unidg.export.plugins.onnx_rewrite import count_attention_nodes, count_plugin_nodes

    model = onnx.load(str(step.onnx), load_external_data=False)
    assert count_attention_nodes(model) == 0 and count_plugin_nodes(model) > 0
    entry = engine_entry(step, "0" * 64, 1.0)
    assert entry["attention"] == "plugin" and entry["onnx"] == "step.plugin.onnx" and entry["plugin"]
    with pytest.raises(EngineError, match="--attention native: .* was exported with the plugin node"):
        plan_builds(_plugin_bundle(), EngineRequest(attention="native"))
    with pytest.raises(EngineError, match="--attention 'flash'"):
        EngineRequest(attention="flash")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed: the build test below runs instead")
def test_engine_command_without_tensorrt_says_so(capsys):
    assert main(["export", "engine", "--bundle", str(nano_bundle())]) == 2
    assert "tensorrt is not installed" in capsys.readouterr().err


def test_engine_build_with_tensorrt(tmp_path):
    if not HAS_TENSORRT:
        pytest.skip("tensorrt not installed")
    import shutil

    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU for TensorRT")
    from unidg.export.engine import build_engines
    from unidg.export.parity import psnr, synthetic_request
    from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest

    bundle = tmp_path / "bundle"
    shutil.copytree(nano_bundle(), bundle)
    table = build_engines(bundle, EngineRequest(timing_cache=tmp_path / "cache.bin"), progress=None)
    assert set(table["plans"]) == set(GRAPH_NAMES) and (tmp_path / "cache.bin").is_file()
    loaded = load_bundle(bundle)  # plan sha256 listed and checked
    assert loaded.engines["compute_capability"] == list(torch.cuda.get_device_capability(0))
    request = SynthesisRequest(*synthetic_request(80, seed=2), seed=4)
    with DefectSynthesizer.from_bundle(bundle, backend="tensorrt") as trt_run:
        trt_image = trt_run.generate(request).diptych
    with DefectSynthesizer.from_bundle(bundle) as ort_run:
        ort_image = ort_run.generate(request).diptych
    assert psnr(trt_image, ort_image) > 35
