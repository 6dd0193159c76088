"""torch backend: runs exported programs (``torch.export``, ``.pt2``) saved in the bundle; torch loads on first use.

The GPU path where neither TensorRT nor onnxruntime-gpu is installed. Programs live beside the ONNX graphs, listed in
the manifest's files and named in its metadata:

    "torch_programs": {"step": "torch/step.pt2", "vae_encoder": "torch/vae_encoder.pt2", ...}

(without that table, ``torch/<graph>.pt2`` files in the manifest are used). Each program takes the graph's inputs
positionally in Bundle-format-v1 order (float32; a UniDG-Text bundle's step takes ``pooled`` last:
``Bundle.step_inputs``) and returns its outputs, exactly like the ONNX graph. The loop keeps x and the conditioning on
the device between steps.

Step caching (docs/step-cache.md): a format-2 bundle whose table also names ``step_head``, ``step_tail`` and
``step_cached`` programs (``unidg export cache-graphs`` writes them when its input bundle has torch programs) runs
the static and dynamic modes through them, the same decisions as the onnxruntime backend. A static schedule runs as
one loop with every tensor on the device (``denoise_static_cache``: nothing comes back to the host until the last
step), and with ``cuda_graph`` that loop is one captured CUDA graph per schedule. A dynamic run reads each step's
signal on the host: the sampler makes the three calls per step, and arrays it hands back unchanged (the head's
outputs, the kept tail residual, x) are not uploaded again: the backend keeps their device copies. FP8 linears, fused
attention and torch.compile (``TorchOptions``, ``unidg.runtime.backends.torch_step_options``) apply to the uncached
step program only, so with any of them set the backend declines step caching (``step_cache_problem``), as it
declines a dynamic run with ``cuda_graph``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np

from unidg.runtime.backends.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    GenerationCancelled,
    ProgressCallback,
    StepConditioning,
    StepHead,
    step_feeds,
)
from unidg.runtime.backends.torch_step_options import (
    GraphRunner,
    TorchOptions,
    check_fused_attention_available,
    euler_loop,
    import_torch,
    optimize_step_program,
    static_cache_loop,
)
from unidg.runtime.bundle import CACHE_GRAPH_NAMES, GRAPH_NAMES, Bundle

PROGRAM_DIR = "torch"
PER_STEP_INPUTS = ("x", "sigma", "sigma_next")  # the step's inputs that change every step; the rest stay resident


def torch_program_files(bundle: Bundle) -> dict[str, str]:
    """Graph name -> program file (relative to the bundle); refuses a bundle without a complete set."""
    table = bundle.metadata.get("torch_programs")
    if table is None:
        table = {
            name: f"{PROGRAM_DIR}/{name}.pt2" for name in GRAPH_NAMES if f"{PROGRAM_DIR}/{name}.pt2" in bundle.files
        }
        if not table:
            raise BackendError(
                f"bundle {bundle.path} has no torch exported programs ({PROGRAM_DIR}/<graph>.pt2); export it with "
                "`unidg export onnx --torch-programs`, or run it with --backend onnxruntime"
            )
    if not isinstance(table, dict):
        raise BackendError(f"bundle {bundle.path}: manifest 'torch_programs' must map graph names to files")
    missing = [name for name in GRAPH_NAMES if name not in table]
    if missing:
        raise BackendError(f"bundle {bundle.path} lacks torch programs for {missing}")
    unlisted = [table[name] for name in GRAPH_NAMES if table[name] not in bundle.files]
    if unlisted:
        raise BackendError(f"bundle {bundle.path}: torch programs {unlisted} are not listed in the manifest's files")
    return {name: table[name] for name in GRAPH_NAMES}


def torch_cache_program_files(bundle: Bundle) -> dict[str, str]:
    """Step-cache graph name -> program file; empty when the bundle has no step-cache graphs or no programs of them
    (the backend then declines step caching, naming the fix)."""
    if not bundle.cache_graphs:
        return {}
    table = bundle.metadata.get("torch_programs")
    if not isinstance(table, dict):
        table = {name: f"{PROGRAM_DIR}/{name}.pt2" for name in CACHE_GRAPH_NAMES}
    files = {name: table.get(name) for name in CACHE_GRAPH_NAMES}
    if any(file is None or file not in bundle.files for file in files.values()):
        return {}
    return files


def resolve_device(torch, device: str):
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise BackendUnavailable(f"unknown torch device {device!r} (use cpu, cuda or cuda:N)") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(
                f"torch device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
                "(torch.cuda.is_available() is False)"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"CUDA device {resolved.index} does not exist")
    return resolved


class TorchBackend(Backend):
    name = "torch"

    def __init__(
        self, bundle: Bundle, programs: dict[str, Callable], device: str = "cpu", options: TorchOptions | None = None
    ) -> None:
        super().__init__(bundle)
        self.torch = import_torch()
        self.device = resolve_device(self.torch, device)
        self.options = options or TorchOptions()
        self.programs = dict(programs)
        self.optimizations: dict = {}
        if self.options != TorchOptions():
            self.programs["step"], self.optimizations = optimize_step_program(
                self.programs["step"], self.options, self.device
            )
        self._loop = GraphRunner(euler_loop(self.programs["step"]), self.device) if self.options.cuda_graph else None
        # cond, ctx, key_bias, guidance, img_ids, txt_ids (+ a text bundle's pooled): euler_loop's argument order
        self.conditioning_inputs = tuple(name for name in bundle.step_inputs if name not in PER_STEP_INPUTS)
        self._conditioning: StepConditioning | None = None
        self._resident: dict = {}
        self._last_x: np.ndarray | None = None
        self._last_x_device = None
        self._kept: dict[str, tuple[np.ndarray, object]] = {}  # step-cache arrays handed out -> their device copies
        self._cache_loops: dict[tuple[bool, ...], GraphRunner] = {}  # captured static step-cache loops, by schedule

    @classmethod
    def from_bundle(
        cls,
        bundle: Bundle,
        device: str = "cpu",
        compile: bool = False,
        fp8: bool = False,
        fused_attention: bool = False,
        cuda_graph: bool = False,
    ) -> TorchBackend:
        torch = import_torch()
        resolved = resolve_device(torch, device)
        options = TorchOptions(compile=compile, fp8=fp8, fused_attention=fused_attention, cuda_graph=cuda_graph)
        if options.fused_attention:
            check_fused_attention_available(resolved)  # before loading gigabytes of programs
        programs = {}
        for graph, file in {**torch_program_files(bundle), **torch_cache_program_files(bundle)}.items():
            path = bundle.file_path(file)
            try:
                module = torch.export.load(str(path)).module()
            except Exception as error:  # torch raises many types for unreadable archives
                raise BackendError(f"torch cannot load {path} ({type(error).__name__}: {error})") from error
            programs[graph] = module.to(resolved)
        return cls(bundle, programs, str(resolved), options)

    @classmethod
    def from_modules(
        cls, bundle: Bundle, modules: dict[str, Callable], device: str = "cpu", options: TorchOptions | None = None
    ) -> TorchBackend:
        """Wrap in-memory callables with the programs' signatures (e.g. a model built from a preset, for benchmarks)."""
        return cls(bundle, modules, device, options)

    def _tensor(self, array: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    def _run(self, graph: str, *inputs) -> np.ndarray:
        with self.torch.inference_mode():
            output = self.programs[graph](*inputs)
        if isinstance(output, tuple | list):
            (output,) = output
        return output.float().cpu().numpy()

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", self._tensor(pixels))

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", self._tensor(latents))

    def encode_reference(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("image_encoder", self._tensor(pixels))

    def _upload_conditioning(self, x: np.ndarray, conditioning: StepConditioning) -> dict:
        if conditioning is not self._conditioning:  # upload the loop's constant inputs once
            feeds = step_feeds(x, conditioning, 0.0, 0.0)
            self._resident = {name: self._tensor(feeds[name]) for name in self.conditioning_inputs}
            self._conditioning = conditioning
            self._last_x = None
        return self._resident

    def step(self, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float) -> np.ndarray:
        resident = self._upload_conditioning(x, conditioning)
        batch = x.shape[0]
        x_device = self._last_x_device if x is self._last_x else self._tensor(x)
        inputs = {**resident, "x": x_device}
        inputs["sigma"] = self._tensor(np.full((batch,), sigma, dtype=np.float32))
        inputs["sigma_next"] = self._tensor(np.full((batch,), sigma_next, dtype=np.float32))
        with self.torch.inference_mode():
            output = self.programs["step"](*(inputs[name] for name in self.bundle.step_inputs))
        if isinstance(output, tuple | list):
            (output,) = output
        self._last_x_device = output
        self._last_x = output.float().cpu().numpy()
        return self._last_x

    # ------------------------------------------------------------------------------------------------ step caching
    def step_cache_problem(self, mode: str | None = None) -> str | None:
        if not self.bundle.cache_graphs:
            return (
                f"bundle {self.bundle.path} has no step-cache graphs; add them with `unidg export cache-graphs`, "
                "or run with --cache off"
            )
        missing = [name for name in CACHE_GRAPH_NAMES if name not in self.programs]
        if missing:
            return (
                f"bundle {self.bundle.path} has no torch programs for the step-cache graphs {missing}: run "
                "`unidg export cache-graphs` on a bundle exported with --torch-programs, or use --backend "
                "onnxruntime, or --cache off"
            )
        if replace(self.options, cuda_graph=False) != TorchOptions():
            return (
                "the torch backend's --compile, --fp8 and --fused-attention apply to the uncached step program only; "
                "drop them to run step caching, or run with --cache off"
            )
        if self.options.cuda_graph and mode == "dynamic":
            return (
                "--cuda-graph captures a static step-cache schedule (the dynamic decision reads each step's signal on "
                "the host); use --cache static, or drop --cuda-graph"
            )
        return None

    def _device(self, role: str, array: np.ndarray):
        """The device tensor of ``array``: the kept copy when the sampler hands back what this backend returned."""
        kept = self._kept.get(role)
        if kept is not None and kept[0] is array:
            return kept[1]
        return self._tensor(array)

    def _run_cache(self, graph: str, arrays: dict, batch: int, sigma: float, sigma_next: float) -> list:
        problem = self.step_cache_problem()
        if problem:
            raise BackendError(problem)
        inputs = []
        for name in self.bundle.cache_inputs[graph]:
            if name in ("sigma", "sigma_next"):
                value = sigma if name == "sigma" else sigma_next
                inputs.append(self._tensor(np.full((batch,), value, dtype=np.float32)))
            else:
                inputs.append(arrays[name])
        with self.torch.inference_mode():
            outputs = self.programs[graph](*inputs)
        return list(outputs) if isinstance(outputs, tuple | list) else [outputs]

    def _keep(self, role: str, tensor) -> np.ndarray:
        array = tensor.float().cpu().numpy()
        self._kept[role] = (array, tensor)
        return array

    def _x_device(self, x: np.ndarray):
        kept = self._kept.get("x")
        if kept is not None and kept[0] is x:
            return kept[1]
        if x is self._last_x and self._last_x_device is not None:
            return self._last_x_device
        return self._tensor(x)

    def step_head(self, x: np.ndarray, conditioning: StepConditioning, sigma: float) -> StepHead:
        resident = self._upload_conditioning(x, conditioning)
        x_device = self._x_device(x)
        outputs = self._run_cache("step_head", {**resident, "x": x_device}, x.shape[0], sigma, sigma)
        self._kept["x"] = (x, x_device)
        hidden, encoder_hidden, temb, first_residual = outputs
        return StepHead(
            self._keep("hidden", hidden),
            self._keep("encoder_hidden", encoder_hidden),
            self._keep("temb", temb),
            first_residual.float().cpu().numpy(),  # read on the host only (the dynamic decision)
        )

    def _head_arrays(self, head: StepHead) -> dict:
        return {role: self._device(role, getattr(head, role)) for role in ("hidden", "encoder_hidden", "temb")}

    def step_tail(
        self, head: StepHead, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float
    ) -> tuple[np.ndarray, np.ndarray]:
        resident = self._upload_conditioning(x, conditioning)
        arrays = {**resident, **self._head_arrays(head), "x": self._x_device(x)}
        x_next, tail_residual = self._run_cache("step_tail", arrays, x.shape[0], sigma, sigma_next)
        return self._keep("x", x_next), self._keep("tail_residual", tail_residual)

    def step_cached(
        self, head: StepHead, tail_residual: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float
    ) -> np.ndarray:
        arrays = {
            **self._head_arrays(head),
            "tail_residual": self._device("tail_residual", tail_residual),
            "x": self._x_device(x),
        }
        (x_next,) = self._run_cache("step_cached", arrays, x.shape[0], sigma, sigma_next)
        return self._keep("x", x_next)

    def denoise_static_cache(
        self,
        noise: np.ndarray,
        conditioning: StepConditioning,
        sigmas: np.ndarray,
        schedule: tuple[bool, ...],
        callback: ProgressCallback | None = None,
    ) -> np.ndarray:
        """The static schedule's loop with every tensor on the device: per step progress; with ``cuda_graph`` one
        captured CUDA graph per schedule and shape, progress at its end."""
        problem = self.step_cache_problem("static")
        if problem:
            raise BackendError(problem)
        steps = len(sigmas) - 1
        resident = self._upload_conditioning(noise, conditioning)
        arguments = (self._tensor(noise), self._tensor(np.asarray(sigmas, dtype=np.float32)))
        arguments += tuple(resident[name] for name in self.conditioning_inputs)
        inputs, names = self.bundle.cache_inputs, self.conditioning_inputs
        if self.options.cuda_graph:
            runner = self._cache_loops.get(schedule)
            if runner is None:
                runner = GraphRunner(static_cache_loop(self.programs, inputs, names, schedule), self.device)
                self._cache_loops[schedule] = runner
            with self.torch.inference_mode():
                result = runner(*arguments).float().cpu().numpy()
            for i in range(steps):
                if callback is not None and callback(i + 1, steps) is False:
                    raise GenerationCancelled(f"cancelled after the captured {steps}-step loop (step {i + 1} reported)")
        else:

            def progress(step: int) -> None:
                if callback is not None and callback(step, steps) is False:
                    raise GenerationCancelled(f"cancelled after step {step}/{steps}")

            with self.torch.inference_mode():
                loop = static_cache_loop(self.programs, inputs, names, schedule, progress)
                result = loop(*arguments).float().cpu().numpy()
        self._last_x = None
        return result

    @property
    def captures_loop(self) -> bool:
        return self._loop is not None

    def run_captured_loop(
        self, noise: np.ndarray, conditioning: StepConditioning, sigmas: np.ndarray, callback: ProgressCallback | None
    ) -> np.ndarray:
        """With ``cuda_graph``: the whole loop as one captured CUDA graph (GraphRunner); progress comes at its end."""
        resident = self._upload_conditioning(noise, conditioning)
        with self.torch.inference_mode():
            x = self._loop(
                self._tensor(noise),
                self._tensor(np.asarray(sigmas, dtype=np.float32)),
                *(resident[name] for name in self.conditioning_inputs),
            )
            result = x.float().cpu().numpy()
        steps = len(sigmas) - 1
        for i in range(steps):
            if callback is not None and callback(i + 1, steps) is False:
                raise GenerationCancelled(f"cancelled after the captured {steps}-step loop (step {i + 1} reported)")
        self._last_x = None
        return result

    def close(self) -> None:
        self.programs, self._resident, self._loop, self._kept, self._cache_loops = {}, {}, None, {}, {}
        self._conditioning = self._last_x = self._last_x_device = None
