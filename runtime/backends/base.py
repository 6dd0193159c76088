"""The one interface every runtime backend implements (onnxruntime, TensorRT, torch).

A backend is created from a checked bundle and runs its four graphs. All arrays crossing the interface are host numpy
float32 in the shapes of Bundle format v1; a backend may keep data on its device between calls (TensorRT and torch keep
the loop state there), but callers only ever see numpy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from unidg.core.errors import UniDGError
from unidg.runtime.bundle import Bundle, cache_graph_inputs

ProgressCallback = Callable[[int, int], "bool | None"]  # (step done, total) -> False cancels


class BackendUnavailable(UniDGError):
    """The backend cannot run here: its package, device or execution provider is missing."""


class BackendError(UniDGError):
    """A backend cannot use this bundle (graph shapes, engine versions, device capability)."""


def device_options(backend: str, device: str | None, what: str = "--device") -> dict:
    """The backend options one device string selects; the same word on the command line, the service and the C ABI.

    onnxruntime: execution providers, ``cpu`` (default), ``cuda``, ``tensorrt`` or several comma-separated in order of
    preference; tensorrt: a CUDA device index (``N`` or ``cuda:N``, default 0); torch: ``cpu`` (default), ``cuda`` or
    ``cuda:N``. ``what`` names the setting in error messages.
    """
    if backend == "onnxruntime":
        providers = [p.strip() for p in (device or "cpu").split(",") if p.strip()]
        if not providers:
            raise UniDGError(f"{what} {device!r}: name an execution provider (cpu, cuda or tensorrt)")
        return {"providers": providers}
    if backend == "tensorrt":
        if device is None:
            return {}
        index = device.removeprefix("cuda:")
        if not index.isdigit():
            raise UniDGError(f"{what} {device!r}: the tensorrt backend takes a CUDA device index (0, 1, ...)")
        return {"device": int(index)}
    return {"device": device or "cpu"}


class GenerationCancelled(Exception):
    """The progress callback returned False: the loop stopped early and nothing was produced."""


class NonFiniteOutputError(UniDGError):
    """A graph produced NaN or Inf: the bundle's weights are corrupt, or the precision overflowed."""


@dataclass(frozen=True)
class StepConditioning:
    """The step graph's inputs that stay fixed over one batch's denoising loop."""

    cond: np.ndarray  # [B, N, 320] packed masked-diptych latents (64) + packed fill mask (256)
    ctx: np.ndarray  # [B, C, J] context tokens: zero text token(s) (UniDG-Text: T5's), then reference (Redux) tokens
    key_bias: np.ndarray  # [B, C + N] additive attention bias per key
    guidance: np.ndarray  # [B] guidance scale
    img_ids: np.ndarray  # [N, 3]
    txt_ids: np.ndarray  # [C, 3]
    pooled: np.ndarray | None = None  # [B, P] a UniDG-Text bundle's CLIP pooled output (its step's 10th input)

    @property
    def batch(self) -> int:
        return int(self.cond.shape[0])


@dataclass(frozen=True)
class StepHead:
    """The step-cache head graph's outputs for one step (unidg.runtime.step_cache)."""

    hidden: np.ndarray  # [B, N, D] image stream after the first block
    encoder_hidden: np.ndarray  # [B, C, D] context stream after the first block
    temb: np.ndarray  # [B, D] time + guidance embedding
    first_residual: np.ndarray  # [B, N, D] what the first block added: the cache signal


class Backend(ABC):
    """Runs a bundle's graphs: ``encode_images``, ``encode_reference``, ``step`` (x 28), ``decode_latents``."""

    name: str = "base"

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle

    @classmethod
    @abstractmethod
    def from_bundle(cls, bundle: Bundle, **options: object) -> Backend:
        """Create the backend for ``bundle``; refuse (BackendError / BackendUnavailable) what it cannot run."""

    @property
    def max_batch(self) -> int | None:
        """The largest batch one call may have (a static bundle: exactly its batch); None: no limit of its own."""
        if self.bundle.batch is not None:
            return self.bundle.batch
        limit = self.bundle.metadata.get("max_batch")  # the export-time bound of a dynamic batch axis
        return int(limit) if isinstance(limit, int) and limit >= 1 else None

    @abstractmethod
    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, S, 2S] pixels in [-1, 1] -> [B, 16, S/8, 2S/8] normalized VAE latents (posterior mean)."""

    @abstractmethod
    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """[B, 16, S/8, 2S/8] normalized latents -> [B, 3, S, 2S] pixels in [-1, 1]."""

    @abstractmethod
    def encode_reference(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, P, P] reference pixels in [-1, 1] -> [B, R, J] reference (Redux) tokens."""

    @abstractmethod
    def step(self, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float) -> np.ndarray:
        """One Euler step of the flow: x [B, N, 64] at ``sigma`` -> x at ``sigma_next``."""

    def step_head(self, x: np.ndarray, conditioning: StepConditioning, sigma: float) -> StepHead:
        """Step caching: embedders + first block at ``sigma`` (every step)."""
        raise self._no_step_cache()

    def step_tail(
        self, head: StepHead, x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Step caching, a full step: the other blocks -> (x at ``sigma_next``, the tail's residual [B, N, D])."""
        raise self._no_step_cache()

    def step_cached(
        self, head: StepHead, tail_residual: np.ndarray, x: np.ndarray, sigma: float, sigma_next: float
    ) -> np.ndarray:
        """Step caching, a cached step: the head's output + a kept tail residual -> x at ``sigma_next``."""
        raise self._no_step_cache()

    def step_cache_problem(self, mode: str | None = None) -> str | None:
        """Why this backend cannot run this bundle's step-cache graphs (a message naming the fix), or None when it can;
        ``mode``: the cache mode asked for (``static`` / ``dynamic``), where a backend runs only one of them.

        A synthesizer turns the bundle's default cache setting off where this is not None and refuses a chosen one
        with this message. The default: a backend runs step caching when it implements the three step-cache calls.
        """
        if type(self).step_head is Backend.step_head:
            return f"the {self.name} backend does not run step caching; use --backend onnxruntime, or --cache off"
        return None

    def _no_step_cache(self) -> BackendError:
        problem = self.step_cache_problem()
        return BackendError(
            problem or f"the {self.name} backend cannot run step caching with bundle {self.bundle.path}"
        )

    def denoise_static_cache(
        self,
        noise: np.ndarray,
        conditioning: StepConditioning,
        sigmas: np.ndarray,
        schedule: tuple[bool, ...],
        callback: ProgressCallback | None = None,
    ) -> np.ndarray | None:
        """A static cache schedule's whole loop in one call where the backend keeps its tensors on the device between
        the head, tail and cached-step calls (torch; with ``cuda_graph`` one captured CUDA graph); None: the sampler
        makes the three calls per step through the host."""
        return None

    def denoise_all(
        self,
        noise: np.ndarray,
        conditioning: StepConditioning,
        sigmas: np.ndarray,
        callback: ProgressCallback | None = None,
    ) -> np.ndarray | None:
        """Run every step in one call where the backend captures the loop (``captures_loop``: TensorRT or torch with
        ``cuda_graph``, one CUDA graph); None: the sampler loops over ``step``."""
        if not self.captures_loop:
            return None
        return self.run_captured_loop(noise, conditioning, sigmas, callback)

    @property
    def captures_loop(self) -> bool:
        """Whether ``denoise_all`` runs the loop in one call (``run_captured_loop``)."""
        return False

    def run_captured_loop(
        self, noise: np.ndarray, conditioning: StepConditioning, sigmas: np.ndarray, callback: ProgressCallback | None
    ) -> np.ndarray:
        """Every step of the flow in one call: reports progress through ``callback`` as steps finish and raises
        ``GenerationCancelled`` when it returns False."""
        raise BackendError(f"the {self.name} backend does not capture the denoising loop; call step() per step")

    def onnxruntime_placement(self) -> tuple[list[str], list[dict] | None, object | None]:
        """Where onnxruntime graphs beside this backend run (a text bundle's encoders): execution providers, their
        options and the session options (threads, spinning). The onnxruntime backend: its own (the same device and
        thread policy); the others: None, the CPU with the runtime's defaults."""
        return ["CPUExecutionProvider"], None, None

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release device memory and sessions (the backend is unusable afterwards)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_finite(array: np.ndarray, what: str, bundle: Bundle) -> None:
    """Refuse NaN/Inf from a graph with a message naming the graph and the likely cause."""
    if not np.isfinite(array).all():
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise NonFiniteOutputError(
            f"{what} produced {bad} NaN/Inf values with bundle {bundle.path}: its weights are corrupt or contain "
            f"NaN/Inf (or {bundle.precision} overflowed); re-export the bundle from a healthy weights folder"
        )


def cache_feeds(graph: str, batch: int, arrays: dict[str, np.ndarray], sigma: float, sigma_next: float) -> dict:
    """The named float32 inputs of a step-cache graph, from ``arrays`` plus the per-sample sigmas (a text bundle's
    head: ``pooled`` too, which ``step_feeds`` puts in its arrays)."""
    scalars = {
        "sigma": np.full((batch,), sigma, dtype=np.float32),
        "sigma_next": np.full((batch,), sigma_next, dtype=np.float32),
    }
    names = cache_graph_inputs("pooled" in arrays)[graph]
    return {name: np.ascontiguousarray({**arrays, **scalars}[name], dtype=np.float32) for name in names}


def step_feeds(x: np.ndarray, conditioning: StepConditioning, sigma: float, sigma_next: float) -> dict[str, np.ndarray]:
    """The step graph's named float32 inputs (Bundle format v1; a text bundle's also ``pooled``) for one call."""
    batch = x.shape[0]
    pooled = {} if conditioning.pooled is None else {"pooled": conditioning.pooled}
    return {
        "x": np.ascontiguousarray(x, dtype=np.float32),
        "cond": conditioning.cond,
        "ctx": conditioning.ctx,
        "key_bias": conditioning.key_bias,
        "sigma": np.full((batch,), sigma, dtype=np.float32),
        "sigma_next": np.full((batch,), sigma_next, dtype=np.float32),
        "guidance": conditioning.guidance,
        "img_ids": conditioning.img_ids,
        "txt_ids": conditioning.txt_ids,
        **pooled,
    }
