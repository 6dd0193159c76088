"""Admission, the upload budget and the synthesis workers.

A request is *admitted* once its body has arrived: at most ``workers + max_queue`` requests hold an admission at a
time, and one more is refused at once (``QueueFull`` → 503); a full service refuses a new request before reading its
body too. Bodies being received draw on ``UploadBudget`` as their bytes arrive, so slow uploads hold no admission place
and almost no memory. An admitted request keeps its upload (compressed bytes) while it waits; a worker decodes it
again right before synthesis, so decoded pictures exist only for requests being checked or synthesized. Each worker
thread owns one synthesizer (a synthesizer is not re-entrant); onnxruntime releases the GIL while a graph runs, so
workers overlap.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unidg.core.settings import UniDGSettings
from unidg.runtime.sampler import GenerationCancelled
from unidg.runtime.serve.config import ServeConfig
from unidg.runtime.serve.metrics import Metrics
from unidg.runtime.serve.protocol import (
    SynthesisParams,
    build_request,
    decode_inputs,
    encode_png,
    options_check,
    public_metadata,
    release_frames,
)
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest

logger = logging.getLogger("unidg.serve")

# -> an object with .settings and .generate(request, progress=...); with .check(request) (DefectSynthesizer's) too,
# requests are checked with it before they queue (their prompt included), else only their options.
SynthesizerFactory = Callable[[], Any]


def bundle_synthesizer_factory(config: ServeConfig) -> SynthesizerFactory:
    def load() -> DefectSynthesizer:
        return DefectSynthesizer.from_bundle(
            config.bundle, backend=config.backend, verify=config.verify, **config.backend_options
        )

    return load


class QueueFull(Exception):
    pass


class SynthesisTimeout(Exception):
    """The request's deadline passed (while queued, or between denoising steps)."""


class UploadBudget:
    """Bytes of request bodies the service holds at once (received so far, or of admitted requests): each request
    reserves its bytes as they arrive and gives them back when it is answered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        with self._lock:
            return self.limit - self._held

    def reserve(self, count: int) -> bool:
        with self._lock:
            if self._held + count > self.limit:
                return False
            self._held += count
            return True

    def release(self, count: int) -> None:
        with self._lock:
            self._held -= count


class Admission:
    """One of the pool's ``workers + max_queue`` places, held from the arrival of the body until the reply."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release = release
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._release()


@dataclass
class Job:
    files: dict[str, bytes]  # the uploads, decoded by the worker
    params: SynthesisParams  # checked, defaults filled, seed drawn
    deadline: float  # time.monotonic()
    admission: Admission
    request_id: str = ""
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)

    def expired(self) -> bool:
        return self.cancel.is_set() or time.monotonic() > self.deadline


@dataclass
class SynthesisOutput:
    image_png: bytes
    mask_png: bytes
    metadata: dict
    width: int
    height: int
    synthesis_s: float


def warmup_request(size: int = 64) -> SynthesisRequest:
    """A small synthetic request: runs every graph once so the first real request does not pay for lazy set-up."""
    reference = np.full((size, size, 3), 180, dtype=np.uint8)
    reference_mask = np.zeros((size, size), dtype=bool)
    reference_mask[size // 4 : size // 2, size // 4 : size // 2] = True
    reference[reference_mask] = (60, 40, 30)
    source = np.full((size, size, 3), 200, dtype=np.uint8)
    target_mask = np.zeros((size, size), dtype=bool)
    target_mask[size // 2 : 3 * size // 4, size // 2 : 3 * size // 4] = True
    return SynthesisRequest(reference, reference_mask, source, target_mask, seed=0, steps=1, name="warm-up")


class SynthesisPool:
    """Admission counting in front of ``workers`` threads, each with its own synthesizer."""

    def __init__(
        self,
        factory: SynthesizerFactory,
        workers: int,
        max_queue: int,
        metrics: Metrics,
        warmup: bool = True,
        max_image_pixels: int = 4096 * 4096,
    ) -> None:
        self._factory = factory
        self._workers = workers
        self._max_queue = max_queue
        self._max_image_pixels = max_image_pixels
        # Admission is counted, not left to queue.Queue(maxsize): a request holds its place from the arrival of its
        # body until a worker is done with it, so "workers + max_queue" bounds the memory held by requests, and
        # --max-queue 0 works.
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._admitted = 0
        self._metrics = metrics
        self._warmup = warmup
        self.settings: UniDGSettings | None = None  # of the loaded bundle (requests are checked against it)
        self.bundle_fingerprint: str | None = None
        self._check: Callable[[SynthesisRequest], SynthesisRequest] | None = None  # a loaded synthesizer's check
        self._threads: list[threading.Thread] = []
        self._running = 0
        self._ready_count = 0
        self._lock = threading.Lock()
        self.load_error: str | None = None
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None

    @property
    def ready(self) -> bool:
        with self._lock:
            return self._ready_count == self._workers and self.load_error is None

    @property
    def depth(self) -> int:
        """Admitted requests not running yet (being received, checked, or waiting for a worker)."""
        with self._lock:
            return max(self._admitted - self._running, 0)

    def start(self) -> None:
        for index in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"unidg-synth-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        # Fail what is still waiting, then wake every worker with a sentinel.
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                if job.future.set_running_or_notify_cancel():
                    job.future.set_exception(CancelledError("the service is shutting down"))
                job.admission.release()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def has_room(self) -> bool:
        """Whether a request could be admitted now (a full service refuses a new request before reading its body)."""
        with self._lock:
            return self._admitted < self._workers + self._max_queue

    def admit(self) -> Admission:
        """A place for one request, or QueueFull at once when ``workers + max_queue`` are taken."""
        with self._lock:
            if self._admitted >= self._workers + self._max_queue:
                raise QueueFull
            self._admitted += 1
        self._metrics.set_queue_depth(self.depth)
        return Admission(self._leave)

    def check(self, request: SynthesisRequest) -> SynthesisRequest:
        """``request`` checked as a worker will check it, before it takes a queue place (RequestError, InputError).
        DefectSynthesizer.check changes nothing a running generation reads (its prompt cache is only looked up), so
        request threads call a loaded worker's check beside that worker; a synthesizer without ``check``: the
        options against the bundle's settings."""
        check = self._check or options_check(self.settings)
        return check(request)

    def submit(self, job: Job) -> None:
        self._queue.put_nowait(job)

    def _leave(self) -> None:
        with self._lock:
            self._admitted -= 1
        self._metrics.set_queue_depth(self.depth)

    def _load(self) -> Any:
        synthesizer = self._factory()
        if self._warmup:
            synthesizer.generate(warmup_request())
        with self._lock:
            self.settings = synthesizer.settings
            if self._check is None:
                self._check = getattr(synthesizer, "check", None)
            bundle = getattr(synthesizer, "bundle", None)
            self.bundle_fingerprint = getattr(bundle, "fingerprint", None)
        return synthesizer

    def _work(self) -> None:
        try:
            synthesizer = self._load()
        except Exception as error:  # a worker that cannot load makes the service not ready, and says why
            logger.exception("loading the synthesizer failed")
            with self._lock:
                self.load_error = f"{type(error).__name__}: {error}"
            synthesizer = None
        with self._lock:
            self._ready_count += 1
            if self._ready_count == self._workers:
                self.ready_after_s = time.monotonic() - self.started_at
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                job.admission.release()  # the client gave up while the job waited
                continue
            if synthesizer is None:
                job.future.set_exception(RuntimeError(f"the synthesizer is not loaded ({self.load_error})"))
                job.admission.release()
                continue
            with self._lock:
                self._running += 1
            self._metrics.set_queue_depth(self.depth)
            self._metrics.add_inflight(1)
            try:
                job.future.set_result(self._run(synthesizer, job))
            except BaseException as error:
                release_frames(error)  # the decoded request in them goes now
                job.future.set_exception(error)
            finally:
                self._metrics.add_inflight(-1)
                with self._lock:
                    self._running -= 1
                job.admission.release()

    def _run(self, synthesizer: Any, job: Job) -> SynthesisOutput:
        if job.expired():
            raise SynthesisTimeout("the request timed out while waiting in the queue")
        stopped = False

        def progress(step: int, total: int) -> bool:
            nonlocal stopped
            stopped = job.expired()
            return not stopped

        request = build_request(decode_inputs(job.files, self._max_image_pixels), job.params, job.request_id)
        started = time.monotonic()
        try:
            result = synthesizer.generate(request, progress=progress)
        except GenerationCancelled as error:
            raise SynthesisTimeout("the request timed out during synthesis and was stopped") from error
        del request
        elapsed = time.monotonic() - started
        self._metrics.observe_synthesis(elapsed)
        image = np.ascontiguousarray(result.image, dtype=np.uint8)
        mask_u8 = np.where(np.asarray(result.mask, dtype=bool), np.uint8(255), np.uint8(0))
        return SynthesisOutput(
            image_png=encode_png(image),
            mask_png=encode_png(mask_u8),
            metadata=public_metadata(result.metadata),
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            synthesis_s=elapsed,
        )
