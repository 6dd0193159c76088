"""TensorRT backend: the bundle's serialized engines, device buffers through NVIDIA's CUDA Python bindings, no torch.

Thin by design and written against NVIDIA's documented Python API (``tensorrt.Runtime.deserialize_cuda_engine``,
``ICudaEngine.get_tensor_*``, ``IExecutionContext.set_input_shape / set_tensor_address / execute_async_v3``;
``cuda.bindings.runtime`` for memory, streams, events and graphs). Everything that does not need the libraries (the
manifest's ``engines`` table, the version and GPU checks, binding shapes, the sigma table) is plain Python in
``unidg.runtime.backends.tensorrt_engines``, tested without a GPU.

Step caching (docs/step-cache.md): a format-2 bundle's ``engines`` table may also hold plans for ``step_head``,
``step_tail`` and ``step_cached`` (``unidg export engine`` builds them for such a bundle). With all three the backend
runs the static and dynamic modes through them, host in and host out per call like the one-shot graphs (the arrays
cross the interface as numpy, the same calls as the onnxruntime backend); without them, or with ``cuda_graph`` (which
captures the uncached loop only), it declines step caching by name (``step_cache_problem``).

The denoising loop keeps x on the GPU (two buffers, ping-pong); with ``cuda_graph=True`` all steps of one batch are
captured once as one CUDA graph and replayed per request, with an event after every step so progress is still
reported (cancelling takes effect when the graph finishes).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from unidg.runtime.backends.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    GenerationCancelled,
    ProgressCallback,
    StepConditioning,
    StepHead,
    cache_feeds,
    step_feeds,
)
from unidg.runtime.backends.tensorrt_engines import (
    EngineSpec,
    binding_bytes,
    binding_shapes,
    check_batch,
    check_engine_compatibility,
    loop_plan,
    parse_engines,
    sigma_addresses,
    sigma_table,
    tensorrt_step_cache_problem,
    tensorrt_version_problem,
)
from unidg.runtime.bundle import ALL_GRAPH_INPUTS, ALL_GRAPH_OUTPUTS, Bundle


# --------------------------------------------------------------------------------------------------- library imports
def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as error:
        raise BackendUnavailable(
            "tensorrt not installed: the tensorrt backend needs TensorRT's Python package and the CUDA Python "
            "bindings (`pip install 'unidg[tensorrt]'` on a machine with an NVIDIA GPU and driver); on other "
            f"machines use --backend onnxruntime ({error})"
        ) from error
    problem = tensorrt_version_problem(tensorrt.__version__)
    if problem:
        raise BackendUnavailable(problem)
    return tensorrt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:  # cuda-python < 12.6 layout
            from cuda import cudart
        except ImportError as error:
            raise BackendUnavailable(
                f"cuda-python not installed: the tensorrt backend needs `pip install 'unidg[tensorrt]'` ({error})"
            ) from error
    return cudart


def _refit_from_onnx(trt, engine, logger, onnx_path: Path) -> None:
    """Fill a weight-stripped plan with the weights of its ONNX graph (NVIDIA's OnnxParserRefitter recipe)."""
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        raise BackendError(f"TensorRT could not refit the weight-stripped plan from {onnx_path}; rebuild the engines")


class _Cuda:
    """Error-checked calls into ``cuda.bindings.runtime`` (each returns (error, *results))."""

    def __init__(self, cudart) -> None:
        self.rt = cudart

    def __call__(self, result, what: str):
        error, values = result[0], result[1:]
        if error != self.rt.cudaError_t.cudaSuccess:
            name = self.rt.cudaGetErrorName(error)[1]
            raise BackendError(f"CUDA error in {what}: {name.decode() if isinstance(name, bytes) else name}")
        return values[0] if len(values) == 1 else values or None

    def malloc(self, nbytes: int) -> int:
        return int(self(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def upload(self, device: int, array: np.ndarray, stream, keep: list | None = None) -> None:
        """Copy ``array`` to ``device``; with ``keep`` the copy stays queued and the host array is appended to
        ``keep``, which the caller holds until its next stream synchronisation. Without it, wait here."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self(self.rt.cudaMemcpyAsync(device, array.ctypes.data, array.nbytes, kind, stream), "cudaMemcpyAsync H2D")
        if keep is None:
            self(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")  # the host array may go away
        else:
            keep.append(array)

    def download(self, device: int, shape: tuple[int, ...], stream) -> np.ndarray:
        host = np.empty(shape, dtype=np.float32)
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self(self.rt.cudaMemcpyAsync(host.ctypes.data, device, host.nbytes, kind, stream), "cudaMemcpyAsync D2H")
        self(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return host


class _Engine:
    """One deserialized plan, its execution context and device buffers for the current batch."""

    def __init__(self, backend: TensorRTBackend, spec: EngineSpec, engine) -> None:
        self.backend, self.spec, self.engine = backend, spec, engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {spec.file} (out of memory?)")
        self.batch: int | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.buffers: dict[str, int] = {}
        self._check_io()

    def _check_io(self) -> None:
        trt = self.backend.trt
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        wanted = set(ALL_GRAPH_INPUTS[self.spec.graph]) | set(ALL_GRAPH_OUTPUTS[self.spec.graph])
        # The builder may drop an input the network does not read (e.g. constant ids); everything else must match.
        required = set(ALL_GRAPH_OUTPUTS[self.spec.graph]) | {ALL_GRAPH_INPUTS[self.spec.graph][0]}
        if not names <= wanted or not required <= names:
            raise BackendError(f"engine {self.spec.file} has tensors {sorted(names)}, expected {sorted(wanted)}")
        self.names = names
        for name in names:
            if self.engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise BackendError(f"engine {self.spec.file} tensor {name!r} is not float32 (Bundle format v1 I/O)")

    def prepare(self, batch: int) -> None:
        """Set input shapes and (re)allocate buffers for ``batch``; addresses are bound per call."""
        if batch == self.batch:
            return
        check_batch(self.spec, self.backend.bundle, batch)
        cuda = self.backend.cuda
        self.release()
        self.shapes = binding_shapes(self.backend.bundle, self.spec.graph, batch)
        for name in ALL_GRAPH_INPUTS[self.spec.graph]:
            if name in self.names and not self.context.set_input_shape(name, self.shapes[name]):
                raise BackendError(f"engine {self.spec.file} rejects input {name} of shape {self.shapes[name]}")
        self.buffers = {name: cuda.malloc(n) for name, n in binding_bytes(self.shapes).items()}
        self.batch = batch

    def bind(self, addresses: dict[str, int]) -> None:
        for name in (*ALL_GRAPH_INPUTS[self.spec.graph], *ALL_GRAPH_OUTPUTS[self.spec.graph]):
            if name not in self.names:
                continue
            if not self.context.set_tensor_address(name, addresses.get(name, self.buffers.get(name))):
                raise BackendError(f"engine {self.spec.file}: cannot bind tensor {name}")

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.backend.stream):
            raise BackendError(f"TensorRT failed to enqueue {self.spec.file}")

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Host in, host out: for the one-shot graphs (VAE, image encoder)."""
        (output,) = self.run_all(feeds)
        return output

    def run_all(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Host in, host out, every output in the graph's order (the step-cache graphs have several)."""
        batch = next(iter(feeds.values())).shape[0]
        self.prepare(batch)
        for name, array in feeds.items():
            if name in self.names:  # an input the builder dropped takes no copy
                self.backend.cuda.upload(self.buffers[name], array, self.backend.stream)
        self.bind({})
        self.enqueue()
        stream = self.backend.stream
        return [
            self.backend.cuda.download(self.buffers[name], self.shapes[name], stream)
            for name in ALL_GRAPH_OUTPUTS[self.spec.graph]
        ]

    def release(self) -> None:
        for pointer in self.buffers.values():
            self.backend.cuda(self.backend.cuda.rt.cudaFree(pointer), "cudaFree")
        self.buffers, self.batch = {}, None


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, bundle: Bundle, trt, cudart, device: int, cuda_graph: bool) -> None:
        super().__init__(bundle)
        self.trt, self.cuda, self.device, self.cuda_graph = trt, _Cuda(cudart), device, cuda_graph
        self.engines: dict[str, _Engine] = {}
        self.stream = None
        self._conditioning: StepConditioning | None = None  # whose arrays sit in the step buffers
        self._last_x: np.ndarray | None = None  # the host copy of the step output; its data is in buffer _x_index
        self._x_index = 0
        self._x_buffers: list[int] = []
        self._sigma_table = 0  # device (steps + 1, B) sigmas for the captured loop
        self._graphs: dict[tuple[int, int], tuple[object, list]] = {}  # (batch, steps) -> (graph exec, events)

    @classmethod
    def from_bundle(cls, bundle: Bundle, device: int = 0, cuda_graph: bool = False) -> TensorRTBackend:
        trt = _import_tensorrt()
        cudart = _import_cudart()
        specs = parse_engines(bundle)
        backend = cls(bundle, trt, cudart, int(device), bool(cuda_graph))
        cuda = backend.cuda
        error, count = cudart.cudaGetDeviceCount()
        if error != cudart.cudaError_t.cudaSuccess:  # e.g. cudaErrorInsufficientDriver / cudaErrorNoDevice
            raise BackendUnavailable(f"no usable CUDA GPU for the tensorrt backend ({error}); use onnxruntime")
        if not 0 <= backend.device < count:
            raise BackendUnavailable(f"CUDA device {device} does not exist ({count} device(s) visible)")
        cuda(cudart.cudaSetDevice(backend.device), "cudaSetDevice")
        properties = cuda(cudart.cudaGetDeviceProperties(backend.device), "cudaGetDeviceProperties")
        capability = (int(properties.major), int(properties.minor))
        name = properties.name.decode(errors="replace") if isinstance(properties.name, bytes) else str(properties.name)
        for spec in specs.values():  # before deserializing: a mismatched plan is refused with a clear reason
            check_engine_compatibility(spec, trt.__version__, capability, f"GPU {backend.device} ({name.strip()})")
        backend.stream = cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        if any(spec.version_compatible for spec in specs.values()):
            # Version-compatible plans carry their own lean runtime (host code); the sha256 check vouched for them.
            runtime.engine_host_code_allowed = True
        backend._runtime, backend._logger = runtime, logger  # both must outlive the engines
        for graph, spec in specs.items():
            engine = runtime.deserialize_cuda_engine(Path(bundle.file_path(spec.file)).read_bytes())
            if engine is None:
                raise BackendError(f"TensorRT could not deserialize {bundle.file_path(spec.file)} (see its log above)")
            if spec.weight_stripped:
                source = bundle.file_path(spec.onnx) if spec.onnx else bundle.graph_path(graph)
                _refit_from_onnx(trt, engine, logger, Path(source))
            backend.engines[graph] = _Engine(backend, spec, engine)
        return backend

    @property
    def max_batch(self) -> int | None:
        limits = [e.spec.batch[1] if e.spec.batch else self.bundle.batch for e in self.engines.values()]
        return min(limits) if limits else super().max_batch

    # ------------------------------------------------------------------------------------------- one-shot graphs
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self.engines["vae_encoder"].run({"pixels": pixels})

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self.engines["vae_decoder"].run({"latents": latents})

    def encode_reference(self, pixels: np.ndarray) -> np.ndarray:
        return self.engines["image_encoder"].run({"pixels": pixels})

    # ------------------------------------------------------------------------------------------------ step caching
    def step_cache_problem(self, mode: str | None = None) -> str | None:
        return tensorrt_step_cache_problem(self.bundle, set(self.engines), self.cuda_graph)

    def _run_cache(self, graph: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        problem = self.step_cache_problem()
        if problem:
            raise BackendError(problem)
        return self.engines[graph].run_all(feeds)

    def step_head(self, x: np.ndarray, conditioning: StepConditioning, sigma: float) -> StepHead:
        feeds = cache_feeds("step_head", x.shape[0], step_feeds(x, conditioning, sigma, sigma), sigma, sigma)
        return StepHead(*self._run_cache("step_head", feeds))

    def step_tail(
        self, head: StepHead, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float
    ) -> tuple[np.ndarray, np.ndarray]:
        arrays = {**step_feeds(x, conditioning, sigma, sigma_next), **vars(head)}
        x_next, tail_residual = self._run_cache(
            "step_tail", cache_feeds("step_tail", x.shape[0], arrays, sigma, sigma_next)
        )
        return x_next, tail_residual

    def step_cached(
        self, head: StepHead, tail_residual: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float
    ) -> np.ndarray:
        arrays = {"hidden": head.hidden, "tail_residual": tail_residual, "temb": head.temb, "x": x}
        (x_next,) = self._run_cache("step_cached", cache_feeds("step_cached", x.shape[0], arrays, sigma, sigma_next))
        return x_next

    # ------------------------------------------------------------------------------------------------ the loop
    def _load_conditioning(self, conditioning: StepConditioning, batch: int) -> _Engine:
        step = self.engines["step"]
        if step.batch != batch:
            self._drop_graphs()  # captured graphs point at the buffers prepare() replaces
            step.prepare(batch)
            self._conditioning = None
            self._x_buffers = [step.buffers["x"], step.buffers["x_next"]]  # x ping-pongs in the step's own buffers
        if self._conditioning is not conditioning:
            feeds = step_feeds(np.zeros(step.shapes["x"], np.float32), conditioning, 0.0, 0.0)
            for name in ("cond", "ctx", "key_bias", "guidance", "img_ids", "txt_ids"):
                self.cuda.upload(step.buffers[name], feeds[name], self.stream)
            self._conditioning = conditioning
            self._last_x = None
        return step

    def step(self, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float) -> np.ndarray:
        batch = x.shape[0]
        step = self._load_conditioning(conditioning, batch)
        queued: list[np.ndarray] = []  # host sources of the queued copies: alive until the download's sync
        if x is not self._last_x:  # x came from the host, not from our previous step
            self._x_index = 0
            self.cuda.upload(self._x_buffers[0], x, self.stream, keep=queued)
        source, target = self._x_buffers[self._x_index], self._x_buffers[1 - self._x_index]
        self.cuda.upload(step.buffers["sigma"], np.full(batch, sigma, np.float32), self.stream, keep=queued)
        self.cuda.upload(step.buffers["sigma_next"], np.full(batch, sigma_next, np.float32), self.stream, keep=queued)
        step.bind({"x": source, "x_next": target})
        step.enqueue()
        self._x_index = 1 - self._x_index
        self._last_x = self.cuda.download(target, step.shapes["x_next"], self.stream)  # the step's one sync
        del queued
        return self._last_x

    @property
    def captures_loop(self) -> bool:
        return self.cuda_graph

    def run_captured_loop(
        self, noise: np.ndarray, conditioning: StepConditioning, sigmas: np.ndarray, callback: ProgressCallback | None
    ) -> np.ndarray:
        """With ``cuda_graph``: every step of one batch as one captured CUDA graph, an event after each for progress."""
        rt, cuda = self.cuda.rt, self.cuda
        batch, steps = noise.shape[0], len(sigmas) - 1
        step = self._load_conditioning(conditioning, batch)
        table = sigma_table(sigmas, batch)  # (steps + 1, stride): rows 256-byte aligned
        key = (batch, steps)
        if key not in self._graphs:
            self._drop_graphs()  # one (batch, steps) graph at a time: it points at this sigma table
            self._sigma_table = cuda.malloc(table.nbytes)
        cuda.upload(self._sigma_table, table, self.stream)
        cuda.upload(self._x_buffers[0], noise, self.stream)
        if key not in self._graphs:  # the warm-up enqueue of the capture reads buffer 0 and writes buffer 1 only
            self._graphs[key] = self._capture(step, batch, steps)
        graph_exec, events = self._graphs[key]
        cuda(rt.cudaGraphLaunch(graph_exec, self.stream), "cudaGraphLaunch")
        cancelled = False
        for i, event in enumerate(events):  # report each step as its event fires
            while rt.cudaEventQuery(event)[0] == rt.cudaError_t.cudaErrorNotReady:
                time.sleep(0.0005)
            if callback is not None and not cancelled and callback(i + 1, steps) is False:
                cancelled = True
        cuda(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        if cancelled:
            raise GenerationCancelled(f"cancelled during the captured {steps}-step loop")
        self._last_x = None
        return cuda.download(self._x_buffers[steps % 2], step.shapes["x"], self.stream)

    def _capture(self, step: _Engine, batch: int, steps: int):
        """Record ``steps`` enqueues (addresses per loop_plan) and an event after each into one CUDA graph."""
        rt, cuda = self.cuda.rt, self.cuda
        addresses = sigma_addresses(self._sigma_table, steps, batch)

        def bind(i: int) -> None:
            read, write, sigma_row = loop_plan(steps)[i]
            sigma, sigma_next = addresses[sigma_row]
            step.bind(
                {
                    "x": self._x_buffers[read],
                    "x_next": self._x_buffers[write],
                    "sigma": sigma,
                    "sigma_next": sigma_next,
                }
            )

        # NVIDIA: enqueue once outside capture after shapes change, so deferred set-up is not captured.
        bind(0)
        step.enqueue()
        cuda(rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        events = [cuda(rt.cudaEventCreate(), "cudaEventCreate") for _ in range(steps)]
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        cuda(rt.cudaStreamBeginCapture(self.stream, mode), "cudaStreamBeginCapture")
        try:
            for i in range(steps):
                bind(i)
                step.enqueue()
                cuda(rt.cudaEventRecord(events[i], self.stream), "cudaEventRecord")
        finally:
            graph = cuda(rt.cudaStreamEndCapture(self.stream), "cudaStreamEndCapture")
        graph_exec = cuda(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        cuda(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
        return graph_exec, events

    def _drop_graphs(self) -> None:
        rt = self.cuda.rt
        for graph_exec, events in self._graphs.values():
            rt.cudaGraphExecDestroy(graph_exec)
            for event in events:
                rt.cudaEventDestroy(event)
        self._graphs.clear()
        if self._sigma_table:
            rt.cudaFree(self._sigma_table)
            self._sigma_table = 0

    def close(self) -> None:
        if self.stream is None:
            return
        rt = self.cuda.rt
        self._drop_graphs()
        for engine in self.engines.values():
            engine.release()
        self._x_buffers = []
        self.engines.clear()
        rt.cudaStreamDestroy(self.stream)
        self.stream = None
