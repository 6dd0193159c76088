"""The Triton model repository under a real Triton Inference Server, on CPU, on loopback ports.

The server is ``tritonserver`` 2.51 with its Python backend from the ``nvidia-pytriton`` 0.7.0 wheel (Linux x86_64
only); it loads the repository ``unidg export triton --kind cpu --instances 2`` writes for the shipped UniDG-nano
bundle. How it is run is docs/triton.md's recipe:

- the backend directory holds the wheel's ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub
  built for this Python's minor version;
- the model's Python is the first ``python3`` on the server's PATH (the embedded interpreter takes sys.prefix and
  site-packages from its ``pyvenv.cfg``), and that Python's own ``libpython3.X.so.1.0`` is first on
  LD_LIBRARY_PATH (the stub links it; the distribution's copy is another build);
- that environment has numpy < 2: the wheel's stubs corrupt every tensor under numpy 2 (pybind11 2.10), and the
  model refuses to load there (checked below with this environment when it has numpy 2).

The wheel is taken from this environment when installed, else installed once with ``pip --no-deps`` into pytest's
cache folder (its own dependencies pin numpy < 2 and are not needed to run the server). When this environment has
numpy 2, the model's environment is a venv in the same cache holding only numpy 1.26 and a .pth that adds this
environment's site-packages behind it. Requests use 4 denoising steps (STEPS input) to keep the file fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unidg.export.commands_triton import bench_triton
from unidg.export.triton_repo import TritonRepoOptions, write_triton_repo
from unidg.runtime.demo import DEFAULT_BUNDLE, DEFAULT_SAMPLES, read_samples

if not (platform.system() == "Linux" and platform.machine() == "x86_64"):
    pytest.skip(
        f"the nvidia-pytriton wheel (tritonserver) is built for Linux x86_64 only; this is {platform.system()} "
        f"{platform.machine()}",
        allow_module_level=True,
    )

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] not installed")
httpx = pytest.importorskip("httpx", reason="httpx not installed (the HTTP/REST client of these tests)")

WHEEL = "nvidia-pytriton==0.7.0"
MODEL_NUMPY = "numpy==1.26.4"  # the wheel's stubs are built with pybind11 2.10: numpy 1.x ABI
STEPS = 4
READY_TIMEOUT_S = 120
INSTANCES = 2


# ------------------------------------------------------------------------------------------------------- provisioning
def _pip(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "install", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _install_once(folder: Path, install: callable) -> Path:
    """Build ``folder`` with ``install(staging)`` in a temporary folder beside it, then rename it into place."""
    if (folder / ".complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        install(staging)
        (staging / ".complete").write_text("ok\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _pytriton_root(cache: Path) -> Path:
    """The folder holding ``pytriton/tritonserver`` and ``nvidia_pytriton.libs``."""
    spec = importlib.util.find_spec("pytriton")  # finds without importing (its import wants numpy < 2)
    if spec is not None and spec.origin and (Path(spec.origin).parent / "tritonserver" / "bin").is_dir():
        return Path(spec.origin).parent.parent

    def install(staging: Path) -> None:
        done = _pip("--no-deps", "--target", str(staging), WHEEL)
        if done.returncode != 0:
            pytest.skip(f"{WHEEL} could not be installed: {done.stderr.strip()[-400:]}")

    return _install_once(cache / "nvidia-pytriton-0.7.0", install)


def _model_environment(cache: Path) -> Path:
    """A Python environment (its prefix) the model runs in: this one, or a numpy-1 overlay on it."""
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        return Path(sys.prefix)
    site_packages = sysconfig.get_paths()["purelib"]
    key = hashlib.sha256(f"{sys.prefix}|{sys.version}|{MODEL_NUMPY}".encode()).hexdigest()[:12]

    def install(staging: Path) -> None:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(staging)], check=True, timeout=120)
        target = next(staging.glob("lib/python3*/site-packages"))
        done = _pip("--no-deps", "--target", str(target), MODEL_NUMPY)
        if done.returncode != 0:
            pytest.skip(f"{MODEL_NUMPY} (for the model's environment) could not be installed: {done.stderr[-400:]}")
        # Appended after the overlay's own site-packages, so its numpy wins; addsitedir runs the .pth files there
        # (the editable unidg install among them).
        (target / "zz_unidg_environment.pth").write_text(f"import site; site.addsitedir({site_packages!r})\n")

    return _install_once(cache / f"triton-model-env-{key}", install)


@dataclass(frozen=True)
class TritonInstall:
    server: Path  # bin/tritonserver
    backends: Path  # a backend directory with the python backend and this Python's stub
    libraries: str  # LD_LIBRARY_PATH for the server and the stub
    model_env: Path  # prefix of the model's Python environment


def _libpython_dir() -> Path:
    libdir = sysconfig.get_config_var("LIBDIR")
    soname = sysconfig.get_config_var("INSTSONAME")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir or not (Path(libdir) / soname).is_file():
        pytest.skip(
            f"this Python ({sys.executable}) has no shared libpython; the Python backend stub embeds "
            f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0 and needs the model's Python's own"
        )
    return Path(libdir)


@pytest.fixture(scope="session")
def triton(pytestconfig, tmp_path_factory) -> TritonInstall:
    cache = pytestconfig.cache.mkdir("unidg-triton-server")
    root = _pytriton_root(cache)
    dist = root / "pytriton" / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not stub.is_file():
        pytest.skip(f"{WHEEL} has no Python backend stub for Python {sys.version_info[0]}.{sys.version_info[1]}")
    backends = tmp_path_factory.mktemp("triton-backends")
    (backends / "python").mkdir()
    for item in (dist / "backends" / "python").iterdir():
        if item.is_file():
            (backends / "python" / item.name).symlink_to(item)
    (backends / "python" / "triton_python_backend_stub").symlink_to(stub)
    libraries = f"{_libpython_dir()}:{root / 'nvidia_pytriton.libs'}"
    return TritonInstall(dist / "bin" / "tritonserver", backends, libraries, _model_environment(cache))


# ------------------------------------------------------------------------------------------------------------ servers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def metadata(self) -> dict:
        return httpx.get(f"{self.http}/v2", timeout=5).json()

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.http}/v2/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def children(self) -> list[int]:
        """Processes whose parent is the server (the Python backend's stubs)."""
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == self.process.pid:
                found.append(int(stat.parent.name))
        return found

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        return self.process.returncode


def start_server(triton: TritonInstall, repository: Path, model_env: Path, folder: Path) -> Server:
    http_port, grpc_port = _free_port(), _free_port()
    while grpc_port == http_port:
        grpc_port = _free_port()
    env = {
        **os.environ,
        # the stub's interpreter finds sys.prefix from the first python3 on PATH (pyvenv.cfg of a venv)
        "PATH": f"{model_env / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "LD_LIBRARY_PATH": f"{triton.libraries}:{os.environ.get('LD_LIBRARY_PATH', '')}".rstrip(":"),
    }
    command = [
        str(triton.server),
        f"--model-repository={repository}",
        f"--backend-directory={triton.backends}",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--allow-metrics=false",
        "--exit-timeout-secs=30",
    ]
    log = folder / "tritonserver.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=folder)
    server = Server(process, http_port, grpc_port, log)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None and not server.ready():
        time.sleep(0.25)
    return server


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("triton-repo") / "repository"
    write_triton_repo(DEFAULT_BUNDLE, out, TritonRepoOptions(instance_kind="cpu", instances=INSTANCES))
    return out


@pytest.fixture(scope="module")
def server(triton, repository, tmp_path_factory):
    server = start_server(triton, repository, triton.model_env, tmp_path_factory.mktemp("triton-server"))
    if not server.ready():
        server.stop()
        pytest.fail(f"tritonserver did not become ready:\n{server.log_text()[-3000:]}")
    yield server
    server.stop()


# ----------------------------------------------------------------------------------------------------------- requests
def _read_case(case) -> dict[str, np.ndarray]:
    """The four input tensors of a sample as a client sends them: PNG pixels, masks 0/255."""

    def pixels(path: Path, mode: str) -> np.ndarray:
        with Image.open(path) as image:
            return np.ascontiguousarray(np.asarray(image.convert(mode)), dtype=np.uint8)

    return {
        "REFERENCE": pixels(case.reference, "RGB"),
        "REFERENCE_MASK": pixels(case.reference_mask, "L"),
        "SOURCE": pixels(case.source, "RGB"),
        "TARGET_MASK": pixels(case.mask, "L"),
    }


def _options(case) -> list[tuple[str, str, np.ndarray]]:
    return [
        ("SEED", "INT64", np.array([case.seed], dtype=np.int64)),
        ("STEPS", "INT32", np.array([STEPS], dtype=np.int32)),
        ("CATEGORY", "BYTES", np.array([case.category.encode()], dtype=np.object_)),
    ]


def grpc_infer(server: Server, tensors: dict[str, np.ndarray], options, datatypes: dict | None = None):
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    inputs = []
    for name, array in tensors.items():
        datatype = (datatypes or {}).get(name, "UINT8")
        item = grpcclient.InferInput(name, list(array.shape), datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    for name, datatype, array in options:
        item = grpcclient.InferInput(name, [1], datatype)
        item.set_data_from_numpy(array)
        inputs.append(item)
    result = client.infer("unidg", inputs, client_timeout=120)
    return result.as_numpy("IMAGE"), result.as_numpy("MASK"), json.loads(result.as_numpy("METADATA")[0])


def http_infer(server: Server, tensors: dict[str, np.ndarray], options) -> tuple:
    """KServe v2 REST with JSON tensors (no tritonclient[http]: another client stack than gRPC)."""
    inputs = [
        {"name": name, "shape": list(array.shape), "datatype": "UINT8", "data": array.reshape(-1).tolist()}
        for name, array in tensors.items()
    ]
    for name, datatype, array in options:
        data = [v.decode() if isinstance(v, bytes) else v.item() for v in array]
        inputs.append({"name": name, "shape": [1], "datatype": datatype, "data": data})
    body = {"inputs": inputs, "outputs": [{"name": n, "parameters": {"binary_data": False}} for n in OUTPUTS]}
    response = httpx.post(f"{server.http}/v2/models/unidg/infer", json=body, timeout=120)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    image = np.array(outputs["IMAGE"]["data"], dtype=np.uint8).reshape(outputs["IMAGE"]["shape"])
    mask = np.array(outputs["MASK"]["data"], dtype=np.uint8).reshape(outputs["MASK"]["shape"])
    return image, mask, json.loads(outputs["METADATA"]["data"][0])


OUTPUTS = ("IMAGE", "MASK", "METADATA")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``unidg generate`` on every shipped sample with the sample's seed and STEPS steps: (abnormal, mask) pixels."""
    results = {}
    for case in read_samples(DEFAULT_SAMPLES):
        out = tmp_path_factory.mktemp("generate") / case.id
        command = [sys.executable, "-m", "unidg.cli", "generate", "--bundle", str(DEFAULT_BUNDLE)]
        command += ["--reference", str(case.reference), "--reference-mask", str(case.reference_mask)]
        command += ["--source", str(case.source), "--mask", str(case.mask), "--seed", str(case.seed)]
        command += ["--steps", str(STEPS), "--category", case.category, "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        with Image.open(out / "abnormal" / "000000.png") as image, Image.open(out / "mask" / "000000.png") as mask:
            results[case.id] = (np.asarray(image.convert("RGB")), np.asarray(mask.convert("L")))
    return results


# -------------------------------------------------------------------------------------------------------------- tests
def test_demo_samples_over_grpc_and_http_equal_unidg_generate(server, generated, triton):
    metadata = server.metadata()
    assert metadata["name"] == "triton" and metadata["version"], metadata
    print(f"tritonserver {metadata['version']}; model environment {triton.model_env}")
    for case in read_samples(DEFAULT_SAMPLES):
        tensors = _read_case(case)
        expected_image, expected_mask = generated[case.id]
        for protocol, infer in (("grpc", grpc_infer), ("http", http_infer)):
            image, mask, metadata = infer(server, tensors, _options(case))
            where = f"{case.id} over {protocol}"
            assert image.dtype == np.uint8 and image.shape == tensors["SOURCE"].shape, where
            assert np.array_equal(image, expected_image), f"{where}: IMAGE differs from unidg generate"
            assert np.array_equal(mask, expected_mask), f"{where}: MASK differs from unidg generate"
            assert (metadata["seed"], metadata["steps"]) == (case.seed, STEPS), where


def _grpc_error(server: Server, tensors: dict, options, datatypes: dict | None = None) -> str:
    with pytest.raises(grpcclient.InferenceServerException) as caught:
        grpc_infer(server, tensors, options, datatypes)
    return caught.value.message()


def test_bad_inputs_get_errors_naming_the_input_and_the_server_stays_ready(server):
    case = read_samples(DEFAULT_SAMPLES)[0]
    good = _read_case(case)
    options = _options(case)

    wrong_dtype = {**good, "REFERENCE": good["REFERENCE"].astype(np.float32)}
    message = _grpc_error(server, wrong_dtype, options, {"REFERENCE": "FP32"})
    assert "'REFERENCE'" in message and "UINT8" in message, message

    empty_mask = {**good, "REFERENCE_MASK": np.zeros_like(good["REFERENCE_MASK"])}
    message = _grpc_error(server, empty_mask, options)
    assert "input REFERENCE_MASK" in message and "empty" in message, message

    source = good["SOURCE"]
    mismatched = {**good, "TARGET_MASK": np.ascontiguousarray(good["TARGET_MASK"][:, : source.shape[1] - 7])}
    message = _grpc_error(server, mismatched, options)
    assert "TARGET_MASK" in message, message

    response = httpx.post(
        f"{server.http}/v2/models/unidg/infer",
        json={"inputs": [{"name": "SOURCE", "shape": [1, 1, 3], "datatype": "UINT8", "data": [0, 0, 0]}]},
        timeout=60,
    )
    assert response.status_code == 400 and "REFERENCE" in response.text, response.text

    assert server.ready() and server.process.poll() is None
    image, _, _ = grpc_infer(server, good, options)  # still serving
    assert image.shape == source.shape


def test_two_instances_serve_concurrent_requests(server):
    case = read_samples(DEFAULT_SAMPLES)[0]
    tensors, options = _read_case(case), _options(case)
    results: list = [None] * 4
    errors: list = []

    def send(slot: int) -> None:
        try:
            results[slot] = grpc_infer(server, tensors, options)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=send, args=(slot,)) for slot in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    instances = {metadata["triton_instance"] for _, _, metadata in results}
    assert instances == {f"unidg_0_{n}" for n in range(INSTANCES)}, instances
    assert all(np.array_equal(image, results[0][0]) for image, _, _ in results)


def test_bench_triton_reports_both_medians(server):
    result = bench_triton(f"127.0.0.1:{server.grpc_port}", steps=2, requests=1)
    assert result["server_version"] == server.metadata()["version"] and result["steps"] == 2
    assert result["triton_grpc_p50_s"] > 0 and result["in_process_p50_s"] > 0 and result["ratio_p50"] > 0


def test_numpy2_model_environment_is_refused_at_load(triton, repository, tmp_path):
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2:
        pytest.skip(f"this environment has numpy {numpy.__version__}; the refusal concerns numpy >= 2")
    server = start_server(triton, repository, Path(sys.prefix), tmp_path)
    try:
        server.process.wait(timeout=READY_TIMEOUT_S)  # a model that fails to load stops the server
    finally:
        server.stop()
    log = server.log_text()
    assert server.process.returncode != 0
    assert "UNAVAILABLE" in log and "corrupts tensors under numpy" in log and "numpy<2" in log, log[-3000:]


def test_server_shuts_down_cleanly(server):
    """Last in this file: stops the module's server (SIGINT, as `docker stop` and Ctrl-C do)."""
    stubs = server.children()
    assert len(stubs) >= INSTANCES, stubs
    assert server.stop() == 0, server.log_text()[-3000:]
    alive = [pid for pid in stubs if Path(f"/proc/{pid}").exists()]
    assert not alive, f"stub processes left behind: {alive}"
    assert "successfully unloaded" in server.log_text()
