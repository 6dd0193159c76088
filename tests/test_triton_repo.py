"""Triton model repository (`unidg export triton`): layout, configs parsed with Triton's own model-config protobuf,
and the Python-backend model run end to end.

Triton itself is not installed here. Every config.pbtxt is parsed into ``inference.ModelConfig`` from tritonclient
(Triton's schema). model.py is executed with a minimal stand-in for ``triton_python_backend_utils`` -- the module
Triton's Python backend injects, which is not on PyPI -- that only carries tensors in and out; the synthesis is the
runtime's. BLS calls are not executed (they need a running server with TensorRT engines).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import rewrite_manifest, sample_request_arrays
from surface_fixtures import (
    LONG_PROMPT,
    OTHER_PROMPT,
    PROMPT,
    masked_equal_outside,
    nano_bundle,
    sample_arrays,
    text_bundle,
    toy_bundle,
)

from unidg.core.manifest import write_manifest
from unidg.export.triton_repo import TritonRepoError, TritonRepoOptions, validate_config, write_triton_repo
from unidg.runtime.bundle import GRAPH_INPUTS, GRAPH_NAMES, GRAPH_OUTPUTS, expected_shapes, load_bundle
from unidg.runtime.demo import DEFAULT_BUNDLE

model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="tritonclient[grpc] not installed (Triton's model-config schema)"
)
from google.protobuf import json_format, text_format  # noqa: E402

PB_UTILS_STAND_IN = textwrap.dedent(
    '''
    """Stand-in for Triton's triton_python_backend_utils: tensors in and out, no server behind it."""
    import numpy as np

    TRITONSERVER_MEMORY_CPU = 0


    class TritonError(Exception):
        INVALID_ARG = 3
        INTERNAL = 13

        def __init__(self, message, code=None):
            super().__init__(message)
            self._message, self._code = message, code

        def message(self):
            return self._message

        def code(self):
            return self._code


    class Tensor:
        def __init__(self, name, array):
            self._name, self._array = name, np.asarray(array)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._array

        def is_cpu(self):
            return True

        def to_dlpack(self):
            return self._array

        @classmethod
        def from_dlpack(cls, name, tensor):
            return cls(name, np.from_dlpack(tensor))


    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self._outputs, self._error = list(output_tensors), error

        def output_tensors(self):
            return self._outputs

        def has_error(self):
            return self._error is not None

        def error(self):
            return self._error


    class PreferredMemory:
        def __init__(self, kind, device):
            self.kind, self.device = kind, device


    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, **options):
            self.model_name = model_name

        def exec(self):
            raise RuntimeError(f"BLS call to {self.model_name}: no Triton server in this test")


    class Request:
        """What Triton hands to execute(): named input tensors."""

        def __init__(self, tensors):
            self.tensors = {t.name(): t for t in tensors}


    def get_input_tensor_by_name(request, name):
        return request.tensors.get(name)


    def get_output_tensor_by_name(response, name):
        return next((t for t in response.output_tensors() if t.name() == name), None)
    '''
)


def parse_config(path: Path):
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return toy_bundle(tmp_path_factory.mktemp("triton") / "bundle")


@pytest.fixture(scope="module")
def engine_bundle(tmp_path_factory):
    """A bundle whose manifest lists TensorRT plans. The plan files are placeholders (TensorRT is not installable
    here): this checks the repository layout and configs only; nothing runs them."""
    folder = toy_bundle(tmp_path_factory.mktemp("triton-engines") / "bundle")
    (folder / "engines").mkdir()
    for name in GRAPH_NAMES:
        (folder / "engines" / f"{name}.plan").write_bytes(f"placeholder plan for {name}".encode())

    def add_engines(metadata: dict) -> None:
        metadata["engines"] = {
            "tensorrt_version": "10.13.0.35",
            "compute_capability": [9, 0],
            "plans": {name: {"file": f"engines/{name}.plan", "batch": [1, 4]} for name in GRAPH_NAMES},
        }

    rewrite_manifest(folder, add_engines)
    return folder


@pytest.fixture()
def pb_utils(tmp_path, monkeypatch):
    folder = tmp_path / "stand_in"
    folder.mkdir()
    (folder / "triton_python_backend_utils.py").write_text(PB_UTILS_STAND_IN)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "triton_python_backend_utils", raising=False)
    import triton_python_backend_utils

    return triton_python_backend_utils


def sample_request_tensors(pb_utils) -> list:
    """The four required inputs of the sample request, as the Python model receives them."""
    reference, reference_mask, source, target_mask = sample_request_arrays()
    return [
        pb_utils.Tensor("REFERENCE", reference),
        pb_utils.Tensor("REFERENCE_MASK", reference_mask.astype(np.uint8)),
        pb_utils.Tensor("SOURCE", source),
        pb_utils.Tensor("TARGET_MASK", target_mask.astype(np.uint8)),
    ]


def export_triton(bundle: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """``unidg export triton --bundle BUNDLE --out OUT EXTRA...`` in a new process."""
    command = [sys.executable, "-m", "unidg.cli", "export", "triton", "--bundle", str(bundle), "--out", str(out)]
    return subprocess.run([*command, *extra], capture_output=True, text=True, timeout=60)


def load_model(repo: Path, name: str = "unidg", kind: str = "CPU"):
    spec = importlib.util.spec_from_file_location(f"triton_model_{abs(hash(repo))}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(parse_config(repo / name / "config.pbtxt"), preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_instance_kind": kind,
            "model_instance_device_id": "0",
            "model_repository": str(repo / name),
            "model_version": "1",
            "model_name": name,
        }
    )
    return module, model


def test_repository_layout_and_python_model_config(bundle, tmp_path):
    repo = write_triton_repo(
        bundle, tmp_path / "repo", TritonRepoOptions(instance_kind="gpu", instances=2, gpus=(0, 1))
    )
    assert sorted(repo.configs) == ["unidg"] and not repo.engine_models
    umask = os.umask(0)
    os.umask(umask)
    # Readable by a Triton server running as another user: the umask's permissions, not mkdtemp's 0700.
    assert stat.S_IMODE((tmp_path / "repo").stat().st_mode) == 0o777 & ~umask
    config = parse_config(tmp_path / "repo" / "unidg" / "config.pbtxt")
    assert config.name == "unidg" and config.backend == "python" and config.max_batch_size == 0
    inputs = {i.name: i for i in config.input}
    assert list(inputs) == [
        "REFERENCE",
        "REFERENCE_MASK",
        "SOURCE",
        "TARGET_MASK",
        "SEED",
        "STEPS",
        "GUIDANCE",
        "CATEGORY",
    ]
    uint8 = model_config_pb2.DataType.Value("TYPE_UINT8")
    assert inputs["SOURCE"].data_type == uint8 and list(inputs["SOURCE"].dims) == [-1, -1, 3]
    assert inputs["TARGET_MASK"].data_type == uint8 and list(inputs["TARGET_MASK"].dims) == [-1, -1]
    assert inputs["SEED"].data_type == model_config_pb2.DataType.Value("TYPE_INT64") and inputs["SEED"].optional
    assert inputs["STEPS"].data_type == model_config_pb2.DataType.Value("TYPE_INT32") and inputs["STEPS"].optional
    assert inputs["GUIDANCE"].data_type == model_config_pb2.DataType.Value("TYPE_FP32")
    assert not inputs["REFERENCE"].optional
    outputs = {o.name: o for o in config.output}
    assert outputs["IMAGE"].data_type == uint8 and outputs["MASK"].data_type == uint8 and "METADATA" in outputs
    (group,) = config.instance_group
    assert group.kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU") and group.count == 2
    assert list(group.gpus) == [0, 1]
    assert config.parameters["bundle_dir"].string_value == "bundle"
    copied = load_bundle(tmp_path / "repo" / "unidg" / "1" / "bundle", verify=True)
    assert copied.fingerprint == load_bundle(bundle).fingerprint
    assert config.parameters["unidg_bundle_fingerprint"].string_value == copied.fingerprint


def test_engine_bundle_gets_tensorrt_plan_models_called_through_bls(engine_bundle, tmp_path):
    repo = write_triton_repo(engine_bundle, tmp_path / "repo", TritonRepoOptions(engine_instances=2))
    assert repo.engine_models == {name: f"unidg_{name}" for name in GRAPH_NAMES}
    meta = load_bundle(engine_bundle).metadata
    shapes = expected_shapes(meta, -1)  # a dynamic-batch bundle: batch axis -1
    fp32 = model_config_pb2.DataType.Value("TYPE_FP32")
    for graph, model_name in repo.engine_models.items():
        config = parse_config(tmp_path / "repo" / model_name / "config.pbtxt")
        assert config.name == model_name and config.platform == "tensorrt_plan" and config.max_batch_size == 0
        assert [i.name for i in config.input] == list(GRAPH_INPUTS[graph])
        assert [o.name for o in config.output] == list(GRAPH_OUTPUTS[graph])
        for tensor in (*config.input, *config.output):
            assert tensor.data_type == fp32 and tuple(tensor.dims) == shapes[graph][tensor.name]
        assert config.instance_group[0].count == 2
        plan = tmp_path / "repo" / model_name / "1" / "model.plan"
        assert plan.read_bytes() == (engine_bundle / "engines" / f"{graph}.plan").read_bytes()
    python = parse_config(tmp_path / "repo" / "unidg" / "config.pbtxt")
    assert json.loads(python.parameters["engine_models"].string_value) == repo.engine_models
    # The Python model reads only the manifest: no second copy of the graphs.
    assert sorted(p.name for p in (tmp_path / "repo" / "unidg" / "1" / "bundle").iterdir()) == ["manifest.json"]
    # --no-engines: the onnxruntime repository instead.
    plain = write_triton_repo(engine_bundle, tmp_path / "plain", TritonRepoOptions(use_engines=False))
    assert sorted(plain.configs) == ["unidg"]


def test_python_model_runs_the_nano_bundle(pytestconfig, tmp_path, pb_utils):
    write_triton_repo(nano_bundle(pytestconfig), tmp_path / "repo", TritonRepoOptions(instance_kind="cpu"))
    _, model = load_model(tmp_path / "repo")
    reference, reference_mask, source, target_mask = sample_request_arrays()
    tensors = [
        pb_utils.Tensor("REFERENCE", reference),
        pb_utils.Tensor("REFERENCE_MASK", reference_mask.astype(np.uint8) * 255),
        pb_utils.Tensor("SOURCE", source),
        pb_utils.Tensor("TARGET_MASK", target_mask.astype(np.uint8)),
        pb_utils.Tensor("SEED", np.array([5], dtype=np.int64)),
        pb_utils.Tensor("STEPS", np.array([3], dtype=np.int32)),
        pb_utils.Tensor("CATEGORY", np.array([b"scratch"], dtype=np.object_)),
    ]
    bad = [t for t in tensors if t.name() != "TARGET_MASK"] + [
        pb_utils.Tensor("TARGET_MASK", np.zeros(source.shape[:2], np.uint8))
    ]
    missing = [t for t in tensors if t.name() != "REFERENCE"]
    good, empty_mask, no_reference, again = model.execute(
        [pb_utils.Request(tensors), pb_utils.Request(bad), pb_utils.Request(missing), pb_utils.Request(tensors)]
    )
    assert not good.has_error(), good.error() and good.error().message()
    outputs = {t.name(): t.as_numpy() for t in good.output_tensors()}
    image, mask = outputs["IMAGE"], outputs["MASK"] > 0
    assert image.dtype == np.uint8 and image.shape == source.shape and set(np.unique(outputs["MASK"])) <= {0, 255}
    assert masked_equal_outside(image, source, mask) and mask[target_mask].all()
    metadata = json.loads(outputs["METADATA"][0])
    assert metadata["seed"] == 5 and metadata["steps"] == 3 and metadata["category"] == "scratch"
    assert empty_mask.has_error() and "target mask" in empty_mask.error().message()
    assert empty_mask.error().code() == pb_utils.TritonError.INVALID_ARG
    assert "input TARGET_MASK (target mask)" in empty_mask.error().message()
    assert no_reference.has_error() and "REFERENCE is missing" in no_reference.error().message()
    assert metadata["triton_instance"] == "unidg"
    assert np.array_equal({t.name(): t.as_numpy() for t in again.output_tensors()}["IMAGE"], image)
    model.finalize()


def test_engine_repository_model_uses_bls(engine_bundle, tmp_path, pb_utils):
    write_triton_repo(engine_bundle, tmp_path / "repo", TritonRepoOptions())
    module, model = load_model(tmp_path / "repo", kind="GPU")
    assert isinstance(model.synthesizer.backend, module.TritonBLSBackend)
    assert model.synthesizer.backend.models["step"] == "unidg_step"
    (response,) = model.execute([pb_utils.Request(sample_request_tensors(pb_utils))])
    # The first graph call goes out through BLS; with no server behind the stand-in it fails, as one response error.
    assert response.has_error() and "BLS call to unidg_vae_encoder" in response.error().message()


def test_configs_are_refused_when_malformed_and_bad_bundles_are_not_exported(bundle, tmp_path):
    with pytest.raises(TritonRepoError, match="not a valid Triton model config"):
        validate_config('name: "x"\nmax_batch_size: "four"\n', "x/config.pbtxt")
    assert validate_config('name: "x"\nbackend: "python"\n', "x/config.pbtxt").backend == "python"
    write_triton_repo(bundle, tmp_path / "repo", TritonRepoOptions())
    with pytest.raises(TritonRepoError, match="exists and is not empty"):
        write_triton_repo(bundle, tmp_path / "repo", TritonRepoOptions())
    write_triton_repo(bundle, tmp_path / "repo", TritonRepoOptions(overwrite=True, bundle_reference="/models/b"))
    config = parse_config(tmp_path / "repo" / "unidg" / "config.pbtxt")
    assert config.parameters["bundle_dir"].string_value == "/models/b"
    assert not (tmp_path / "repo" / "unidg" / "1" / "bundle").exists()
    # A bundle changed after export is refused before anything is written.
    changed = tmp_path / "changed"
    toy_bundle(changed)
    (changed / "step.onnx").write_bytes((changed / "step.onnx").read_bytes() + b"\0")
    result = export_triton(changed, tmp_path / "r2")
    assert result.returncode == 2 and "does not match its manifest" in result.stderr
    assert not (tmp_path / "r2").exists()
    write_manifest(changed, "bundle", {})  # re-signed but no longer a bundle
    with pytest.raises(ValueError, match="format"):
        write_triton_repo(changed, tmp_path / "r3", TritonRepoOptions())


def test_cli_writes_a_repository(bundle, tmp_path):
    result = export_triton(bundle, tmp_path / "repo", "--kind", "cpu", "--instances", "3")
    assert result.returncode == 0, result.stderr
    assert "tritonserver --model-repository" in result.stdout
    config = parse_config(tmp_path / "repo" / "unidg" / "config.pbtxt")
    assert config.instance_group[0].count == 3
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")


def test_step_cache_parameters_reach_the_python_model(tmp_path, pb_utils):
    options = TritonRepoOptions(instance_kind="cpu", cache="dynamic", cache_threshold=0.12)
    write_triton_repo(DEFAULT_BUNDLE, tmp_path / "repo", options)
    config = parse_config(tmp_path / "repo" / "unidg" / "config.pbtxt")
    assert config.parameters["cache"].string_value == "dynamic"
    assert float(config.parameters["cache_threshold"].string_value) == 0.12
    _, model = load_model(tmp_path / "repo")
    (response,) = model.execute([pb_utils.Request(sample_request_tensors(pb_utils))])
    assert not response.has_error(), response.error() and response.error().message()
    metadata = json.loads({t.name(): t.as_numpy() for t in response.output_tensors()}["METADATA"][0])
    assert metadata["step_cache"]["mode"] == "dynamic" and metadata["step_cache"]["threshold"] == 0.12
    assert metadata["step_cache"]["full_steps"] < metadata["steps"]
    model.finalize()


def test_step_cache_on_a_bundle_without_cache_data_is_refused_when_writing(bundle, tmp_path):
    with pytest.raises(TritonRepoError, match="no step-cache data"):
        write_triton_repo(bundle, tmp_path / "repo", TritonRepoOptions(instance_kind="cpu", cache="static"))
    assert not (tmp_path / "repo").exists()


# --------------------------------------------------------------------------------------- UniDG-Text: the PROMPT input
def _text_tensors(pb_utils, prompt: object = None, *kinds: str) -> list:
    """The shipped sample's ``kinds`` (reference, reference_mask, source, mask) as tensors, 3 steps, seed 4, and
    ``prompt`` (str: UTF-8 encoded; bytes: as they are) as PROMPT."""
    names = {"reference": "REFERENCE", "reference_mask": "REFERENCE_MASK", "source": "SOURCE", "mask": "TARGET_MASK"}
    arrays = sample_arrays()
    tensors = [pb_utils.Tensor(names[kind], arrays[kind]) for kind in kinds]
    tensors += [pb_utils.Tensor("SEED", np.array([4], np.int64)), pb_utils.Tensor("STEPS", np.array([3], np.int32))]
    if prompt is not None:
        value = prompt.encode("utf-8") if isinstance(prompt, str) else prompt
        tensors.append(pb_utils.Tensor("PROMPT", np.array([value], dtype=np.object_)))
    return tensors


def _outputs(response) -> dict:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def test_a_text_bundle_repository_takes_a_prompt_with_the_reference_optional(tmp_path, pb_utils):
    write_triton_repo(text_bundle(), tmp_path / "repo", TritonRepoOptions(instance_kind="cpu"))
    inputs = {i.name: i for i in parse_config(tmp_path / "repo" / "unidg" / "config.pbtxt").input}
    assert list(inputs)[-1] == "PROMPT" and inputs["PROMPT"].optional
    assert inputs["PROMPT"].data_type == model_config_pb2.DataType.Value("TYPE_STRING")
    assert list(inputs["PROMPT"].dims) == [1]
    assert inputs["REFERENCE"].optional and inputs["REFERENCE_MASK"].optional
    assert not inputs["SOURCE"].optional and not inputs["TARGET_MASK"].optional

    _, model = load_model(tmp_path / "repo")
    alone, full = ("source", "mask"), ("reference", "reference_mask", "source", "mask")
    cases = [
        _text_tensors(pb_utils, PROMPT, *alone),
        _text_tensors(pb_utils, OTHER_PROMPT, *alone),
        _text_tensors(pb_utils, PROMPT, *full),
        _text_tensors(pb_utils, None, *full),  # the bundle's reference instruction
        _text_tensors(pb_utils, "", *alone),
        _text_tensors(pb_utils, LONG_PROMPT, *alone),
        _text_tensors(pb_utils, b"Add the \xff defect to the image.", *alone),
        _text_tensors(pb_utils, PROMPT, "reference", "source", "mask"),
        _text_tensors(pb_utils, None, *alone),
    ]
    hole, crack, both, reference, empty, long, not_utf8, no_mask, nothing = model.execute(
        [pb_utils.Request(tensors) for tensors in cases]
    )
    hole, crack = _outputs(hole), _outputs(crack)
    metadata = json.loads(hole["METADATA"][0])
    assert metadata["prompt"] == PROMPT and metadata["with_reference"] is False
    source, mask = sample_arrays()["source"], hole["MASK"] > 0
    assert masked_equal_outside(hole["IMAGE"], source, mask) and masked_equal_outside(crack["IMAGE"], source, mask)
    assert not np.array_equal(hole["IMAGE"][mask], crack["IMAGE"][mask])  # the instruction matters, inside only
    assert json.loads(_outputs(both)["METADATA"][0])["with_reference"] is True
    assert json.loads(_outputs(reference)["METADATA"][0])["prompt"]
    for response, words in [
        (empty, "prompt is empty"),
        (long, "at most 48"),
        (not_utf8, "must be UTF-8"),
        (no_mask, "input REFERENCE_MASK (reference mask)"),
        (nothing, "input REFERENCE is missing"),
    ]:
        assert response.has_error() and words in response.error().message(), response.error().message()
        assert response.error().code() == pb_utils.TritonError.INVALID_ARG
    for response in (empty, long, not_utf8):
        assert "input PROMPT" in response.error().message()
    model.finalize()


def test_a_prompt_for_a_reference_mode_model_is_refused_naming_it(bundle, tmp_path, pb_utils):
    write_triton_repo(bundle, tmp_path / "repo", TritonRepoOptions(instance_kind="cpu"))
    inputs = [i.name for i in parse_config(tmp_path / "repo" / "unidg" / "config.pbtxt").input]
    assert "PROMPT" not in inputs  # a reference-mode repository is as before (Triton itself refuses PROMPT)
    _, model = load_model(tmp_path / "repo")
    prompt = pb_utils.Tensor("PROMPT", np.array([PROMPT.encode()], dtype=np.object_))
    (response,) = model.execute([pb_utils.Request([*sample_request_tensors(pb_utils), prompt])])
    assert response.has_error() and response.error().code() == pb_utils.TritonError.INVALID_ARG
    assert "input PROMPT" in response.error().message() and "reference-mode bundle" in response.error().message()
    model.finalize()


def test_a_text_bundle_with_engines_is_refused(tmp_path):
    folder = tmp_path / "text-engines"
    shutil.copytree(text_bundle(), folder)
    (folder / "engines").mkdir()
    for name in GRAPH_NAMES:
        (folder / "engines" / f"{name}.plan").write_bytes(b"placeholder")
    rewrite_manifest(
        folder,
        lambda meta: meta.update(
            engines={
                "tensorrt_version": "10.13.0.35",
                "compute_capability": [9, 0],
                "plans": {name: {"file": f"engines/{name}.plan", "batch": [1, 1]} for name in GRAPH_NAMES},
            }
        ),
    )
    with pytest.raises(TritonRepoError, match="UniDG-Text bundle.*--no-engines"):
        write_triton_repo(folder, tmp_path / "repo", TritonRepoOptions())
    assert not (tmp_path / "repo").exists()
