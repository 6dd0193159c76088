"""A Triton Inference Server model repository for a bundle: ``unidg export triton --bundle B --out REPO``.

Layout (docs/triton.md):

    REPO/unidg/config.pbtxt             Python-backend model (inputs: UINT8 images + masks, SEED/STEPS/GUIDANCE...;
                                        a UniDG-Text bundle's also PROMPT, with the reference pair optional)
    REPO/unidg/1/model.py               wraps the runtime's DefectSynthesizer (runtime/backends/triton_model.py, copied)
    REPO/unidg/1/bundle/                the bundle (ONNX graphs + manifest), or only its manifest for an engine repo
    REPO/unidg_<graph>/config.pbtxt     for a bundle with TensorRT engines: one ``tensorrt_plan`` model per graph
    REPO/unidg_<graph>/1/model.plan     (step, vae_encoder, vae_decoder, image_encoder), called from model.py by BLS

The bundle is checked (manifest, sha256 of every file) before anything is written; the repository is written into a
temporary folder beside ``REPO`` and renamed into place. Every config.pbtxt is text-format ``inference.ModelConfig``;
when ``tritonclient`` is installed they are parsed with Triton's own protobuf schema before the rename.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from unidg.core.errors import UniDGError
from unidg.core.manifest import MANIFEST_FILE
from unidg.core.settings import SETTINGS_FILE
from unidg.core.staging import staged_folder
from unidg.runtime import backends as runtime_backends
from unidg.runtime.backends.tensorrt_engines import parse_engines
from unidg.runtime.bundle import GRAPH_INPUTS, GRAPH_OUTPUTS, Bundle, expected_shapes, load_bundle
from unidg.runtime.step_cache import StepCacheError, bundle_step_cache

# The Python-backend model is runtime code (it runs the lean runtime inside Triton); the repository gets a copy.
MODEL_TEMPLATE = Path(runtime_backends.__file__).with_name("triton_model.py")
INSTANCE_KINDS = {"gpu": "KIND_GPU", "cpu": "KIND_CPU"}

# The Python-backend model's tensors: (name, Triton data type, dims, optional).
PYTHON_INPUTS = (
    ("REFERENCE", "TYPE_UINT8", (-1, -1, 3), False),
    ("REFERENCE_MASK", "TYPE_UINT8", (-1, -1), False),
    ("SOURCE", "TYPE_UINT8", (-1, -1, 3), False),
    ("TARGET_MASK", "TYPE_UINT8", (-1, -1), False),
    ("SEED", "TYPE_INT64", (1,), True),
    ("STEPS", "TYPE_INT32", (1,), True),
    ("GUIDANCE", "TYPE_FP32", (1,), True),
    ("CATEGORY", "TYPE_STRING", (1,), True),
)
# A UniDG-Text bundle's model: the instruction, and the reference pair optional beside it.
TEXT_INPUTS = (("PROMPT", "TYPE_STRING", (1,), True),)
REFERENCE_INPUTS = ("REFERENCE", "REFERENCE_MASK")
PYTHON_OUTPUTS = (
    ("IMAGE", "TYPE_UINT8", (-1, -1, 3)),
    ("MASK", "TYPE_UINT8", (-1, -1)),
    ("METADATA", "TYPE_STRING", (1,)),
)


class TritonRepoError(UniDGError):
    """The repository cannot be written as asked."""


@dataclass(frozen=True)
class TritonRepoOptions:
    model_name: str = "unidg"
    instance_kind: str = "gpu"  # of the Python model (and of the engine models, which are always GPU)
    instances: int = 1  # per device listed in ``gpus`` (or per visible GPU)
    gpus: tuple[int, ...] = ()  # empty: every GPU Triton sees
    engine_instances: int = 1
    use_engines: bool = True  # bundles with TensorRT engines get tensorrt_plan models (BLS)
    bundle_reference: str | None = None  # the bundle's path as the server sees it: referenced, not copied
    providers: str | None = None  # onnxruntime providers in the Python model (default: cuda on KIND_GPU)
    execution_env: str | None = None  # EXECUTION_ENV_PATH of the Python backend (a conda-pack archive)
    cache: str | None = None  # step caching in the model (None: the bundle's gated default; docs/step-cache.md)
    cache_threshold: float | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.instance_kind not in INSTANCE_KINDS:
            raise TritonRepoError(f"instance kind {self.instance_kind!r} is not one of {sorted(INSTANCE_KINDS)}")
        if self.instances < 1 or self.engine_instances < 1:
            raise TritonRepoError("instance counts must be >= 1")
        if not self.model_name.replace("_", "").replace("-", "").isalnum():
            raise TritonRepoError(f"model name {self.model_name!r} must be letters, digits, '_' or '-'")


@dataclass
class TritonRepo:
    path: Path
    model_name: str
    configs: dict[str, Path] = field(default_factory=dict)  # model name -> config.pbtxt
    engine_models: dict[str, str] = field(default_factory=dict)  # graph -> model name
    bundle_dir: str = "bundle"


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid protobuf text-format string


def _dims(dims: tuple[int | str, ...]) -> str:
    return "[ " + ", ".join(str(d if isinstance(d, int) else -1) for d in dims) + " ]"


def _tensor(name: str, dtype: str, dims: tuple, optional: bool = False) -> str:
    lines = [f"    name: {_quote(name)}", f"    data_type: {dtype}", f"    dims: {_dims(dims)}"]
    if optional:
        lines.append("    optional: true")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _instance_group(kind: str, count: int, gpus: tuple[int, ...]) -> str:
    lines = [f"    count: {count}", f"    kind: {kind}"]
    if gpus and kind == "KIND_GPU":
        lines.append(f"    gpus: [ {', '.join(str(g) for g in gpus)} ]")
    return "instance_group [\n  {\n" + "\n".join(lines) + "\n  }\n]\n"


def _parameters(values: dict[str, str]) -> str:
    blocks = [
        f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}\n"
        for key, value in values.items()
    ]
    return "".join(blocks)


def python_inputs(text: bool = False) -> tuple[tuple[str, str, tuple, bool], ...]:
    """The Python model's input tensors; ``text`` (a UniDG-Text bundle): PROMPT too, and the reference pair optional.
    A reference-mode bundle's inputs are those of every earlier repository."""
    if not text:
        return PYTHON_INPUTS
    specs = tuple((n, dtype, dims, optional or n in REFERENCE_INPUTS) for n, dtype, dims, optional in PYTHON_INPUTS)
    return specs + TEXT_INPUTS


def python_model_config(name: str, options: TritonRepoOptions, parameters: dict[str, str], text: bool = False) -> str:
    inputs = ",\n".join(_tensor(*spec) for spec in python_inputs(text))
    outputs = ",\n".join(_tensor(*spec) for spec in PYTHON_OUTPUTS)
    return (
        "# UniDG defect synthesis (Python backend; written by `unidg export triton`, see docs/triton.md).\n"
        f"name: {_quote(name)}\n"
        'backend: "python"\n'
        "# Images differ in size from request to request: no Triton batching (the runtime batches internally).\n"
        "max_batch_size: 0\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n"
        + _instance_group(INSTANCE_KINDS[options.instance_kind], options.instances, options.gpus)
        + _parameters(parameters)
    )


def engine_model_config(name: str, graph: str, bundle: Bundle, options: TritonRepoOptions) -> str:
    """A ``tensorrt_plan`` model for one graph; dims are the bundle's (batch -1 for a dynamic-batch bundle)."""
    shapes = expected_shapes(bundle.metadata, -1 if bundle.batch is None else bundle.batch)[graph]
    inputs = ",\n".join(_tensor(t, "TYPE_FP32", shapes[t]) for t in GRAPH_INPUTS[graph])
    outputs = ",\n".join(_tensor(t, "TYPE_FP32", shapes[t]) for t in GRAPH_OUTPUTS[graph])
    return (
        f"# UniDG {graph} graph as a TensorRT plan, called by the {options.model_name!r} model through BLS.\n"
        f"name: {_quote(name)}\n"
        'platform: "tensorrt_plan"\n'
        "# The graphs carry their batch axis explicitly (Bundle format v1).\n"
        "max_batch_size: 0\n"
        f"input [\n{inputs}\n]\n"
        f"output [\n{outputs}\n]\n" + _instance_group("KIND_GPU", options.engine_instances, options.gpus)
    )


def validate_config(text: str, where: str) -> object | None:
    """Parse ``text`` as Triton's ``inference.ModelConfig`` when tritonclient is installed; None when it is not."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ModuleNotFoundError:
        return None
    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise TritonRepoError(f"{where} is not a valid Triton model config: {error}") from error


def _copy_bundle(bundle: Bundle, target: Path, manifest_only: bool) -> None:
    if not manifest_only:
        shutil.copytree(bundle.path, target)
        return
    target.mkdir(parents=True)
    for name in (MANIFEST_FILE, SETTINGS_FILE):
        if (bundle.path / name).is_file():
            shutil.copy2(bundle.path / name, target / name)


def write_triton_repo(bundle_path: str | Path, out: str | Path, options: TritonRepoOptions) -> TritonRepo:
    """Check the bundle and write the model repository ``out`` (atomically: temp folder + rename)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not options.overwrite:
        raise TritonRepoError(f"{out} exists and is not empty; choose a new folder or pass --overwrite")
    bundle = load_bundle(bundle_path, verify=True)
    engines: dict = {}
    if options.use_engines and bundle.engines:
        engines = parse_engines(bundle)
    if engines and options.bundle_reference is not None:
        raise TritonRepoError("a bundle with engines is copied into the repository; drop --reference-bundle")
    if engines and bundle.text:
        raise TritonRepoError(
            f"{bundle.path} is a UniDG-Text bundle: its graphs run in onnxruntime inside the Python model (the engine "
            "models take no instruction features); add --no-engines"
        )

    with staged_folder(out, replace=options.overwrite) as staging:
        repo = TritonRepo(path=out, model_name=options.model_name)
        version_dir = staging / options.model_name / "1"
        version_dir.mkdir(parents=True)
        shutil.copy2(MODEL_TEMPLATE, version_dir / "model.py")
        parameters = {"bundle_dir": "bundle"}
        if options.bundle_reference is not None:
            parameters["bundle_dir"] = options.bundle_reference
        else:
            _copy_bundle(bundle, version_dir / "bundle", manifest_only=bool(engines))
        repo.bundle_dir = parameters["bundle_dir"]
        for graph, spec in engines.items():
            name = f"{options.model_name}_{graph}"
            (staging / name / "1").mkdir(parents=True)
            shutil.copy2(bundle.path / spec.file, staging / name / "1" / "model.plan")
            text = engine_model_config(name, graph, bundle, options)
            validate_config(text, f"{name}/config.pbtxt")
            (staging / name / "config.pbtxt").write_text(text)
            repo.engine_models[graph] = name
        if repo.engine_models:
            parameters["engine_models"] = json.dumps(repo.engine_models, sort_keys=True)
        if options.providers:
            parameters["providers"] = options.providers
        if options.execution_env:
            parameters["EXECUTION_ENV_PATH"] = options.execution_env
        if options.cache is not None or options.cache_threshold is not None:
            try:
                bundle_step_cache(bundle, options.cache, options.cache_threshold)  # refused now, not in the server
            except StepCacheError as error:
                raise TritonRepoError(str(error)) from error
            if repo.engine_models:
                raise TritonRepoError(
                    "--cache with TensorRT engine models: the step-cache graphs have no engine models yet; add "
                    "--no-engines (onnxruntime in the Python model) or leave --cache out"
                )
            if options.cache is not None:
                parameters["cache"] = options.cache
            if options.cache_threshold is not None:
                parameters["cache_threshold"] = repr(float(options.cache_threshold))
        parameters["unidg_bundle_fingerprint"] = bundle.fingerprint
        text = python_model_config(options.model_name, options, parameters, text=bool(bundle.text))
        validate_config(text, f"{options.model_name}/config.pbtxt")
        (staging / options.model_name / "config.pbtxt").write_text(text)
    repo.configs = {p.parent.name: p for p in sorted(out.glob("*/config.pbtxt"))}
    return repo


__all__ = [
    "TritonRepo",
    "TritonRepoError",
    "TritonRepoOptions",
    "engine_model_config",
    "python_inputs",
    "python_model_config",
    "validate_config",
    "write_triton_repo",
]
