"""TensorRT backend: the manifest's engine table, version / GPU compatibility, binding shapes, the captured loop plan.

TensorRT itself cannot be installed here; the test that deserializes and runs engines skips naming that.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from runtime_fixtures import make_toy_bundle, rewrite_manifest

from unidg.runtime.backends import BackendError, BackendUnavailable, create_backend
from unidg.runtime.backends.tensorrt_backend import TensorRTBackend, _Cuda
from unidg.runtime.backends.tensorrt_engines import (
    EngineMismatchError,
    EngineSpec,
    binding_bytes,
    binding_shapes,
    check_batch,
    check_engine_compatibility,
    loop_plan,
    parse_compute_capability,
    parse_engines,
    sigma_addresses,
    sigma_table,
    tensorrt_version_problem,
)
from unidg.runtime.bundle import load_bundle


def _spec(**overrides) -> EngineSpec:
    values = {"graph": "step", "file": "engines/step.plan", "tensorrt_version": "10.13.0.35"}
    values["compute_capability"] = (9, 0)
    values.update(overrides)
    return EngineSpec(**values)


@pytest.fixture()
def engine_bundle(tmp_path):
    """A toy bundle with (placeholder) plan files listed in its manifest: enough for everything but running them."""
    folder = make_toy_bundle(tmp_path / "bundle", resolution=64, batch="dynamic")
    (folder / "engines").mkdir()
    for name in ("step", "vae_encoder", "vae_decoder", "image_encoder"):
        (folder / "engines" / f"{name}.plan").write_bytes(b"plan bytes of " + name.encode())

    def edit(meta: dict) -> None:
        meta["engines"] = {
            "tensorrt_version": "10.13.0.35",
            "compute_capability": [9, 0],
            "device_name": "NVIDIA H100 80GB HBM3",
            "plans": {
                name: {"file": f"engines/{name}.plan", "batch": [1, 4]}
                for name in ("step", "vae_encoder", "vae_decoder", "image_encoder")
            },
        }
        meta["engines"]["plans"]["vae_decoder"]["compute_capability"] = "sm_89"  # per-plan override

    rewrite_manifest(folder, edit)
    return load_bundle(folder)


def test_engine_table_is_read_with_per_plan_overrides(engine_bundle):
    specs = parse_engines(engine_bundle)
    assert set(specs) == {"step", "vae_encoder", "vae_decoder", "image_encoder"}
    assert specs["step"] == EngineSpec(
        graph="step",
        file="engines/step.plan",
        tensorrt_version="10.13.0.35",
        compute_capability=(9, 0),
        batch=(1, 4),
        device_name="NVIDIA H100 80GB HBM3",
    )
    assert specs["vae_decoder"].compute_capability == (8, 9)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda e: e.clear(), "has no TensorRT engines"),
        (lambda e: e["plans"].pop("vae_encoder"), "lacks plans for ['vae_encoder']"),
        (lambda e: e.pop("tensorrt_version"), "lacks 'tensorrt_version'"),
        (lambda e: e.update(compute_capability="ninety"), "not a compute capability"),
        (lambda e: e["plans"]["step"].update(file="engines/other.plan"), "not listed in the manifest's files"),
        (lambda e: e["plans"]["step"].update(batch=[4, 1]), "batch [4, 1]"),
        (lambda e: e["plans"]["step"].pop("batch"), "dynamic-batch bundle needs"),
        (lambda e: e.update(hardware_compatibility="everything"), "hardware_compatibility"),
    ],
)
def test_malformed_engine_tables_are_refused(engine_bundle, edit, words):
    rewrite_manifest(engine_bundle.path, lambda meta: edit(meta["engines"]))
    with pytest.raises(BackendError) as error:
        parse_engines(load_bundle(engine_bundle.path))
    assert words in str(error.value)


@pytest.mark.parametrize(
    "value, expected", [([9, 0], (9, 0)), ("8.9", (8, 9)), ("sm_90", (9, 0)), ("86", (8, 6)), ("sm_100", (10, 0))]
)
def test_compute_capability_forms(value, expected):
    assert parse_compute_capability(value) == expected


def test_same_version_and_gpu_is_accepted():
    check_engine_compatibility(_spec(), "10.13.0.35", (9, 0))
    check_engine_compatibility(_spec(tensorrt_version="10.13.0"), "10.13.0.35", (9, 0))  # shorter spelling


@pytest.mark.parametrize(
    "spec, runtime, capability, words",
    [
        (_spec(), "10.13.1.4", (9, 0), "built with TensorRT 10.13.0.35 but this is TensorRT 10.13.1.4"),
        (_spec(), "10.12.0.36", (9, 0), "only run on the TensorRT version that built them"),
        (_spec(), "10.13.0.35", (8, 9), "compute capability 9.0"),
        (_spec(compute_capability=(8, 0)), "10.13.0.35", (8, 6), "is 8.6"),
        (_spec(hardware_compatibility="ampere_plus"), "10.13.0.35", (7, 5), "Ampere and later"),
        (_spec(version_compatible=True), "10.12.0.36", (9, 0), "not older than the builder"),
        (_spec(version_compatible=True, tensorrt_version="8.5.3"), "8.6.1", (9, 0), "version-compatible"),
        (_spec(version_compatible=True), "12.0.0", (9, 0), "cannot run"),
    ],
)
def test_incompatible_plans_are_refused(spec, runtime, capability, words):
    with pytest.raises(EngineMismatchError) as error:
        check_engine_compatibility(spec, runtime, capability, "GPU 0")
    assert words in str(error.value)
    assert "rebuild the engines" in str(error.value)


@pytest.mark.parametrize(
    "spec, runtime, capability",
    [
        (_spec(version_compatible=True), "10.14.1.48", (9, 0)),  # later runtime, same major
        (_spec(version_compatible=True), "11.0.0", (9, 0)),  # 10 -> 11 is a supported cross-major pair
        (_spec(hardware_compatibility="ampere_plus"), "10.13.0.35", (8, 6)),  # any Ampere+ GPU
        (_spec(hardware_compatibility="ampere_plus"), "10.13.0.35", (12, 0)),
    ],
)
def test_compatible_plans_are_accepted(spec, runtime, capability):
    check_engine_compatibility(spec, runtime, capability)


def test_binding_shapes_follow_the_bundle(engine_bundle):
    shapes = binding_shapes(engine_bundle, "step", 3)
    n = (64 // 16) * (128 // 16)
    c = engine_bundle.context_tokens
    assert shapes == {
        "x": (3, n, 64),
        "cond": (3, n, 320),
        "ctx": (3, c, engine_bundle.joint_dim),
        "key_bias": (3, c + n),
        "sigma": (3,),
        "sigma_next": (3,),
        "guidance": (3,),
        "img_ids": (n, 3),
        "txt_ids": (c, 3),
        "x_next": (3, n, 64),
    }
    assert binding_shapes(engine_bundle, "vae_encoder", 2) == {"pixels": (2, 3, 64, 128), "latents": (2, 16, 8, 16)}
    assert binding_shapes(engine_bundle, "image_encoder", 1)["tokens"] == (1, 16, engine_bundle.joint_dim)
    assert binding_bytes(shapes)["key_bias"] == 3 * (c + n) * 4


def test_batch_must_fit_the_profile(engine_bundle, tmp_path):
    spec = parse_engines(engine_bundle)["step"]
    check_batch(spec, engine_bundle, 4)
    with pytest.raises(BackendError, match="batch 1..4"):
        check_batch(spec, engine_bundle, 5)
    static = load_bundle(make_toy_bundle(tmp_path / "static", batch=2))
    with pytest.raises(BackendError, match="runs batch 2 only"):
        check_batch(_spec(batch=None), static, 1)


def test_loop_plan_ping_pongs_and_walks_the_sigma_table():
    plan = loop_plan(5)
    assert [p[2] for p in plan] == [0, 1, 2, 3, 4]
    for (read, write, _), (next_read, _, _) in zip(plan, plan[1:]):
        assert write == next_read and read != write  # each step reads what the previous one wrote
    assert plan[-1][1] == 5 % 2  # where the result ends up


@pytest.mark.parametrize("batch", [1, 2, 3, 7, 64, 65])
def test_captured_loop_binds_256_byte_aligned_sigma_rows(batch):
    """setTensorAddress needs 256-byte aligned addresses: every sigma / sigma_next row must start on one."""
    steps, base = 28, 0x7F0000000000  # cudaMalloc memory is 256-byte aligned
    addresses = sigma_addresses(base, steps, batch)
    assert len(addresses) == steps
    for i, (sigma, sigma_next) in enumerate(addresses):
        assert sigma % 256 == 0 and sigma_next % 256 == 0
        assert sigma_next == addresses[i + 1][0] if i + 1 < steps else True  # step i's next is step i+1's sigma
    sigmas = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)
    table = sigma_table(sigmas, batch)
    assert table.nbytes >= (addresses[-1][1] - base) + batch * 4  # the last row read lies inside the table
    for i, (sigma, _) in enumerate(addresses):  # the row at each address holds sigma_i for every sample
        row = table.reshape(-1)[(sigma - base) // 4 :][:batch]
        assert np.array_equal(row, np.full(batch, sigmas[i], np.float32))


class _RecordingCudaRuntime:
    """Stands in for cuda.bindings.runtime to count the host-side calls of one step (no GPU result is involved)."""

    class cudaError_t:  # noqa: N801 (the binding's own name)
        cudaSuccess = 0

    class cudaMemcpyKind:  # noqa: N801
        cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost = 1, 2

    def __init__(self) -> None:
        self.calls: list[str] = []

    def cudaMemcpyAsync(self, *args):  # noqa: N802
        self.calls.append("cudaMemcpyAsync")
        return (0,)

    def cudaStreamSynchronize(self, stream):  # noqa: N802
        self.calls.append("cudaStreamSynchronize")
        return (0,)


class _StepEngine:
    def __init__(self, batch: int, shape: tuple[int, ...]) -> None:
        self.batch, self.shapes = batch, {"x": shape, "x_next": shape}
        self.buffers = {"x": 256, "x_next": 512, "sigma": 768, "sigma_next": 1024}
        self.bound: list[dict] = []

    def bind(self, addresses: dict) -> None:
        self.bound.append(addresses)

    def enqueue(self) -> None:
        pass


def test_step_synchronises_once(engine_bundle):
    """Uploads of x and the sigmas are queued; the download of x_next is the step's only stream sync."""
    runtime = _RecordingCudaRuntime()
    backend = TensorRTBackend(engine_bundle, trt=None, cudart=runtime, device=0, cuda_graph=False)
    assert isinstance(backend.cuda, _Cuda)
    step = _StepEngine(1, (1, 8, 64))
    backend.engines["step"] = step
    backend._x_buffers = [step.buffers["x"], step.buffers["x_next"]]
    conditioning = object()
    backend._conditioning = conditioning  # conditioning already resident on the device
    x = np.zeros((1, 8, 64), np.float32)
    for i in range(3):
        runtime.calls.clear()
        x = backend.step(x, conditioning, 1.0 - i / 3, 1.0 - (i + 1) / 3)
        assert runtime.calls.count("cudaStreamSynchronize") == 1, runtime.calls
        assert runtime.calls[-1] == "cudaStreamSynchronize"  # after the download that ends the step
        # the first step uploads x, sigma and sigma_next; later steps keep x on the device (ping-pong)
        assert runtime.calls.count("cudaMemcpyAsync") == (4 if i == 0 else 3)
    assert [b["x"] for b in step.bound] == [256, 512, 256]


@pytest.mark.parametrize("version, ok", [("10.9.0.34", False), ("10.14.1.48", False), ("10.15.1.29", True),
                                         ("11.1.0.5", True)])  # fmt: skip
def test_tensorrt_version_gate(version, ok):
    problem = tensorrt_version_problem(version)
    assert (problem is None) == ok
    if not ok:
        assert version in problem and ">= 10.15" in problem and "RMSNormalization" in problem


def test_plugin_plans_need_the_build_sm():
    plugin = _spec(plugin=True, hardware_compatibility="same_compute_capability", tensorrt_version="10.15.1.29")
    check_engine_compatibility(plugin, "10.15.1.29", (9, 0))
    with pytest.raises(EngineMismatchError, match="PTX for that SM only"):
        check_engine_compatibility(plugin, "10.15.1.29", (10, 0))
    # the same plan without the plugin, hardware-compatible for Ampere+, runs on a later GPU
    check_engine_compatibility(_spec(hardware_compatibility="ampere_plus"), "10.13.0.35", (10, 0))


def test_hardware_compatible_plugin_plan_is_refused(engine_bundle, tmp_path):
    import dataclasses

    table = {**engine_bundle.engines, "hardware_compatibility": "ampere_plus"}
    table["plans"] = {**table["plans"], "step": {**table["plans"]["step"], "plugin": True}}
    with pytest.raises(BackendError, match="attention plugin cannot be hardware-compatible"):
        parse_engines(dataclasses.replace(engine_bundle, engines=table))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_backend_says_tensorrt_is_missing(engine_bundle):
    with pytest.raises(BackendUnavailable, match="tensorrt not installed"):
        create_backend("tensorrt", engine_bundle)


def _build_plans(bundle_path, trt) -> None:
    """Build fp32 plans for the toy bundle's graphs with NVIDIA's builder API (batch profile 1..4)."""
    from cuda.bindings import runtime as cudart

    logger = trt.Logger(trt.Logger.WARNING)
    (bundle_path / "engines").mkdir(exist_ok=True)
    for name in ("step", "vae_encoder", "vae_decoder", "image_encoder"):
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        assert parser.parse((bundle_path / f"{name}.onnx").read_bytes()), parser.get_error(0)
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            shape = list(tensor.shape)
            if shape[0] == -1:
                low, opt, high = ([b] + shape[1:] for b in (1, 2, 4))
                profile.set_shape(tensor.name, low, opt, high)
        config.add_optimization_profile(profile)
        plan = builder.build_serialized_network(network, config)
        (bundle_path / "engines" / f"{name}.plan").write_bytes(bytes(plan))
    properties = cudart.cudaGetDeviceProperties(0)[1]

    def edit(meta: dict) -> None:
        meta["engines"] = {
            "tensorrt_version": trt.__version__,
            "compute_capability": [properties.major, properties.minor],
            "plans": {
                n: {"file": f"engines/{n}.plan", "batch": [1, 4]}
                for n in ("step", "vae_encoder", "vae_decoder", "image_encoder")
            },
        }

    rewrite_manifest(bundle_path, edit)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_engines_run_and_match_onnxruntime(tmp_path, cuda_graph):
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("tensorrt not installed")
    import tensorrt as trt
    from runtime_fixtures import sample_request_arrays

    from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest

    folder = make_toy_bundle(tmp_path / "bundle", resolution=64)
    _build_plans(folder, trt)
    requests = [SynthesisRequest(*sample_request_arrays(seed=i), seed=i) for i in range(2)]
    with DefectSynthesizer.from_bundle(folder) as reference:
        expected = reference.generate_batch(requests)
    steps = []
    with DefectSynthesizer.from_bundle(folder, backend="tensorrt", cuda_graph=cuda_graph) as synth:
        results = synth.generate_batch(requests, progress=lambda step, total: steps.append(step))
    assert steps == list(range(1, 29))
    for got, want in zip(results, expected):
        assert np.abs(got.diptych.astype(int) - want.diptych.astype(int)).max() <= 2


def test_every_cuda_runtime_call_exists_in_cuda_python():
    """The backend's cuda.bindings.runtime names (functions, enums) exist in the installed CUDA Python bindings."""
    import inspect
    import re

    from unidg.runtime.backends import tensorrt_backend

    if importlib.util.find_spec("cuda") is None:
        pytest.skip("cuda-python not installed")
    from cuda.bindings import runtime

    source = inspect.getsource(tensorrt_backend)
    names = set(re.findall(r"(?<!\w)(?:rt|cudart)\.(\w+(?:\.\w+)?)", source))
    assert len(names) > 20
    missing = []
    for name in sorted(names):
        value = runtime
        for part in name.split("."):
            value = getattr(value, part, None)
        if value is None:
            missing.append(name)
    assert not missing


def test_plan_graph_must_be_listed(engine_bundle):
    """A plan records the graph it was parsed from (refit source of a stripped plan); it must be hash-checked."""
    import dataclasses

    table = {**engine_bundle.engines}
    table["plans"] = {**table["plans"], "step": {**table["plans"]["step"], "onnx": "step.native.onnx"}}
    with pytest.raises(BackendError, match="its graph step.native.onnx is not listed"):
        parse_engines(dataclasses.replace(engine_bundle, engines=table))
    listed = dataclasses.replace(engine_bundle, engines=table, files={**engine_bundle.files, "step.native.onnx": "0"})
    assert parse_engines(listed)["step"].onnx == "step.native.onnx"
