"""HTTP service for stations: ``unidg serve --bundle B``.

One FastAPI app around ``DefectSynthesizer``. Requests are validated on the event loop (cheap), then queued for a
fixed pool of worker threads; each worker owns one synthesizer (a synthesizer is not re-entrant) and onnxruntime
releases the GIL while a graph runs, so workers overlap. The queue is bounded: when it is full the service answers 503
with ``Retry-After`` at once instead of piling up memory. A request that outlives ``timeout`` is answered 504 and its
synthesis is stopped at the next denoising step through the progress callback.

Endpoints (docs/service.md): ``POST /v1/synthesize`` (multipart in, JSON with base64 PNGs out), ``GET /healthz``,
``GET /readyz``, ``GET /metrics`` (Prometheus text).

Layering: this module is part of ``unidg.runtime``; FastAPI and Starlette are imported inside ``create_app`` so the
lean runtime imports it without the ``[serve]`` extra.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import queue
import secrets
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from unidg.runtime.images import (
    REFERENCE_IMAGE,
    REFERENCE_MASK,
    SOURCE_IMAGE,
    TARGET_MASK,
    InputError,
    image_from_pil,
    mask_from_pil,
    validate_request,
)
from unidg.runtime.sampler import GenerationCancelled
from unidg.runtime.settings import UniDGSettings
from unidg.runtime.synthesizer import DefectSynthesizer, RequestError, SynthesisRequest, check_request_options

logger = logging.getLogger("unidg.serve")

API_KEY_HEADER = "X-API-Key"
# Multipart field of each input, and the name the runtime's InputError uses for it.
UPLOAD_FIELDS: dict[str, str] = {
    "reference": REFERENCE_IMAGE,
    "reference_mask": REFERENCE_MASK,
    "source": SOURCE_IMAGE,
    "mask": TARGET_MASK,
}
FIELD_OF_INPUT = {name: upload for upload, name in UPLOAD_FIELDS.items()}
PARAM_NAMES = ("seed", "steps", "guidance", "category")
MAX_SEED = 2**63 - 1
MAX_CATEGORY_CHARS = 64
DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``unidg serve`` takes. ``workers`` are synthesis threads (each holds one synthesizer)."""

    bundle: str
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_queue: int = 8  # requests waiting for a worker (running ones not counted)
    timeout_s: float = 120.0  # per request, queue wait included
    max_upload_mb: float = 20.0  # whole request body
    max_image_pixels: int = 4096 * 4096  # per uploaded image, checked before decoding
    max_steps: int = 200
    api_key: str | None = None
    backend: str = "onnxruntime"
    backend_options: dict = field(default_factory=dict)
    warmup: bool = True

    def __post_init__(self) -> None:
        for name in ("workers", "max_steps", "max_image_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0 (got {self.max_queue})")
        if not self.timeout_s > 0:
            raise ValueError(f"--timeout must be > 0 seconds (got {self.timeout_s})")
        if not self.max_upload_mb > 0:
            raise ValueError(f"--max-upload-mb must be > 0 (got {self.max_upload_mb})")
        if self.api_key is not None and not self.api_key:
            raise ValueError("the API key is empty; set the environment variable to a non-empty secret")
        check_bind_address(self.host, self.api_key)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_address(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without an API key: the service runs a GPU-heavy model for anyone."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"refusing to bind to {host}: only loopback (127.0.0.1, ::1, localhost) is allowed without an API key; "
            "put a secret in an environment variable and pass --api-key-env VAR (clients send it as X-API-Key)"
        )


# ---------------------------------------------------------------------------------------------------------------------
# Requests and errors


class ServiceError(Exception):
    """An error answered as JSON ``{"error": code, "field": ..., "message": ...}`` with an HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict:
        body = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class SynthesisTimeout(Exception):
    """The request's deadline passed (while queued, or between denoising steps)."""


@dataclass(frozen=True)
class SynthesisParams:
    """Per-request sampling choices; None means the bundle's default."""

    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    category: str | None = None


@dataclass
class SynthesisInputs:
    reference: np.ndarray
    reference_mask: np.ndarray
    source: np.ndarray
    target_mask: np.ndarray


def parse_params(text: str | None, max_steps: int) -> SynthesisParams:
    """The optional JSON ``params`` field: ``{"seed": int, "steps": int, "guidance": float, "category": str}``."""
    if text is None or not text.strip():
        return SynthesisParams()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ServiceError(400, "invalid_params", f"params is not valid JSON ({error})", "params") from error
    if not isinstance(raw, dict):
        raise ServiceError(400, "invalid_params", "params must be a JSON object", "params")
    unknown = sorted(set(raw) - set(PARAM_NAMES))
    if unknown:
        raise ServiceError(
            422, "invalid_params", f"unknown params {unknown}; known: {list(PARAM_NAMES)}", f"params.{unknown[0]}"
        )

    def integer(name: str, low: int, high: int) -> int | None:
        value = raw.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ServiceError(
                422, "invalid_params", f"{name} must be an integer in [{low}, {high}] (got {value!r})", f"params.{name}"
            )
        return value

    guidance = raw.get("guidance")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
            raise ServiceError(
                422, "invalid_params", f"guidance must be a finite number (got {guidance!r})", "params.guidance"
            )
        if not 0 <= guidance <= 1000:
            raise ServiceError(
                422, "invalid_params", f"guidance must be in [0, 1000] (got {guidance})", "params.guidance"
            )
        guidance = float(guidance)
    category = raw.get("category")
    if category is not None and (not isinstance(category, str) or not 0 < len(category) <= MAX_CATEGORY_CHARS):
        raise ServiceError(
            422,
            "invalid_params",
            f"category must be a non-empty string of at most {MAX_CATEGORY_CHARS} characters (got {category!r})",
            "params.category",
        )
    return SynthesisParams(
        seed=integer("seed", 0, MAX_SEED), steps=integer("steps", 1, max_steps), guidance=guidance, category=category
    )


def decode_upload(data: bytes, field_name: str, max_pixels: int, as_mask: bool) -> np.ndarray:
    """Decode one uploaded PNG/JPEG (uint8 RGB image or bool mask), refusing oversized pictures before decoding."""
    name = UPLOAD_FIELDS[field_name]
    if not data:
        raise ServiceError(422, "invalid_input", f"{field_name} ({name}) is an empty file", field_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ServiceError(
                    413,
                    "image_too_large",
                    f"{field_name} ({name}) is {width}x{height} = {width * height} pixels; this service accepts at "
                    f"most {max_pixels} pixels per image; downscale it first",
                    field_name,
                )
            image.load()
        image = ImageOps.exif_transpose(image)
        array = mask_from_pil(image, name) if as_mask else image_from_pil(image, name)
    except InputError as error:
        raise ServiceError(422, "invalid_input", f"{field_name}: {error}", field_name) from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        raise ServiceError(
            422, "invalid_input", f"{field_name} ({name}) is not a readable PNG or JPEG image ({error})", field_name
        ) from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ServiceError(
            413, "image_too_large", f"{field_name} ({name}) is too large ({error})", field_name
        ) from error
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ServiceError(422, "invalid_input", f"{field_name} ({name}) has no pixels", field_name)
    return array


def check_inputs(inputs: SynthesisInputs) -> None:
    try:
        validate_request(inputs.reference, inputs.reference_mask, inputs.source, inputs.target_mask)
    except InputError as error:
        field_name = FIELD_OF_INPUT.get(error.name, error.name)
        raise ServiceError(422, "invalid_input", f"{field_name}: {error}", field_name) from error


def check_options(request: SynthesisRequest, settings: UniDGSettings) -> SynthesisRequest:
    """The runtime's own checks of seed/steps/guidance/category, before the request takes a queue place."""
    try:
        return check_request_options(request, settings)
    except (RequestError, ValueError) as error:
        named = [name for name in PARAM_NAMES if f" {name} " in f" {error} "]
        field_name = f"params.{named[0]}" if named else "params"
        raise ServiceError(422, "invalid_params", str(error), field_name) from error


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # compress_level 1: the service is latency-bound; PNG stays lossless either way.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def jsonable(value: Any) -> Any:
    """Metadata as plain JSON (numpy scalars/arrays, paths and tuples converted)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


# ---------------------------------------------------------------------------------------------------------------------
# Synthesis: what the workers run


SynthesizerFactory = Callable[[], Any]  # -> an object with .settings and .generate(request, progress=...)


def bundle_synthesizer_factory(config: ServeConfig) -> SynthesizerFactory:
    def load() -> DefectSynthesizer:
        return DefectSynthesizer.from_bundle(config.bundle, backend=config.backend, **config.backend_options)

    return load


def build_request(inputs: SynthesisInputs, params: SynthesisParams, name: str) -> SynthesisRequest:
    """The runtime request; without a seed the service draws one (and reports it in the metadata)."""
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return SynthesisRequest(
        reference=inputs.reference,
        reference_mask=inputs.reference_mask,
        source=inputs.source,
        target_mask=inputs.target_mask,
        seed=seed,
        steps=params.steps,
        guidance=params.guidance,
        category=params.category,
        name=name,
    )


@dataclass
class Job:
    request: SynthesisRequest
    deadline: float  # time.monotonic()
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)
    request_id: str = ""

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


class QueueFull(Exception):
    pass


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
    """A bounded queue in front of ``workers`` threads, each with its own synthesizer."""

    def __init__(
        self,
        factory: SynthesizerFactory,
        workers: int,
        max_queue: int,
        metrics: Metrics,
        warmup: bool = True,
    ) -> None:
        self._factory = factory
        self._workers = workers
        self._max_queue = max_queue
        # Admission is counted, not left to queue.Queue(maxsize): a job holds its place from submit until a worker is
        # done with it, so "workers + max_queue" bounds the memory held by requests, and --max-queue 0 works.
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._admitted = 0
        self._metrics = metrics
        self._warmup = warmup
        self.settings: UniDGSettings | None = None  # of the loaded bundle (requests are checked against it)
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
        """Admitted requests not yet picked up by a worker."""
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
                self._release(running=False)
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._admitted >= self._workers + self._max_queue:
                raise QueueFull
            self._admitted += 1
        self._queue.put_nowait(job)
        self._metrics.set_queue_depth(self.depth)

    def _release(self, running: bool) -> None:
        with self._lock:
            self._admitted -= 1
            if running:
                self._running -= 1
        self._metrics.set_queue_depth(self.depth)

    def _load(self) -> Any:
        synthesizer = self._factory()
        if self._warmup:
            synthesizer.generate(warmup_request())
        with self._lock:
            self.settings = synthesizer.settings
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
                self._release(running=False)  # the client gave up while the job waited
                continue
            if synthesizer is None:
                job.future.set_exception(RuntimeError(f"the synthesizer is not loaded ({self.load_error})"))
                self._release(running=False)
                continue
            with self._lock:
                self._running += 1
            self._metrics.set_queue_depth(self.depth)
            self._metrics.add_inflight(1)
            try:
                job.future.set_result(self._run(synthesizer, job))
            except BaseException as error:
                job.future.set_exception(error)
            finally:
                self._metrics.add_inflight(-1)
                self._release(running=True)

    def _run(self, synthesizer: Any, job: Job) -> SynthesisOutput:
        if job.expired():
            raise SynthesisTimeout("the request timed out while waiting in the queue")
        stopped = False

        def progress(step: int, total: int) -> bool:
            nonlocal stopped
            stopped = job.expired()
            return not stopped

        started = time.monotonic()
        try:
            result = synthesizer.generate(job.request, progress=progress)
        except GenerationCancelled as error:
            raise SynthesisTimeout("the request timed out during synthesis and was stopped") from error
        elapsed = time.monotonic() - started
        self._metrics.observe_synthesis(elapsed)
        image = np.ascontiguousarray(result.image, dtype=np.uint8)
        mask_u8 = np.where(np.asarray(result.mask, dtype=bool), np.uint8(255), np.uint8(0))
        return SynthesisOutput(
            image_png=encode_png(image),
            mask_png=encode_png(mask_u8),
            metadata=jsonable(result.metadata),
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            synthesis_s=elapsed,
        )


# ---------------------------------------------------------------------------------------------------------------------
# Metrics (Prometheus text exposition format 0.0.4, no client library needed)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.total += 1
        self.sum += value
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[index] += 1

    def render(self, name: str, labels: str = "") -> list[str]:
        sep = "," if labels else ""
        lines = [
            f'{name}_bucket{{{labels}{sep}le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.counts)
        ]
        lines.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.total}')
        suffix = f"{{{labels}}}" if labels else ""
        lines.append(f"{name}_sum{suffix} {self.sum:.6f}")
        lines.append(f"{name}_count{suffix} {self.total}")
        return lines


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.synthesis = Histogram(LATENCY_BUCKETS)
        self.queue_depth = 0
        self.inflight = 0

    def observe_request(self, path: str, status: int, seconds: float | None) -> None:
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            if seconds is not None:
                self.latency.observe(seconds)

    def count_error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def observe_synthesis(self, seconds: float) -> None:
        with self._lock:
            self.synthesis.observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        with self._lock:
            self.queue_depth = depth

    def add_inflight(self, delta: int) -> None:
        with self._lock:
            self.inflight += delta

    def render(self, ready: bool, capacity: int, workers: int) -> str:
        with self._lock:
            lines = [
                "# HELP unidg_requests_total HTTP requests by path and status code.",
                "# TYPE unidg_requests_total counter",
            ]
            for (path, status), count in sorted(self.requests.items()):
                lines.append(f'unidg_requests_total{{path="{path}",status="{status}"}} {count}')
            lines += [
                "# HELP unidg_errors_total Failed synthesis requests by kind.",
                "# TYPE unidg_errors_total counter",
            ]
            for kind, count in sorted(self.errors.items()):
                lines.append(f'unidg_errors_total{{kind="{kind}"}} {count}')
            lines += [
                "# HELP unidg_request_duration_seconds Latency of POST /v1/synthesize (all outcomes).",
                "# TYPE unidg_request_duration_seconds histogram",
                *self.latency.render("unidg_request_duration_seconds"),
                "# HELP unidg_synthesis_duration_seconds Worker time per completed synthesis.",
                "# TYPE unidg_synthesis_duration_seconds histogram",
                *self.synthesis.render("unidg_synthesis_duration_seconds"),
                "# HELP unidg_queue_depth Requests waiting for a worker.",
                "# TYPE unidg_queue_depth gauge",
                f"unidg_queue_depth {self.queue_depth}",
                "# HELP unidg_queue_capacity Maximum waiting requests before 503.",
                "# TYPE unidg_queue_capacity gauge",
                f"unidg_queue_capacity {capacity}",
                "# HELP unidg_inflight Syntheses running now.",
                "# TYPE unidg_inflight gauge",
                f"unidg_inflight {self.inflight}",
                "# HELP unidg_workers Synthesis worker threads.",
                "# TYPE unidg_workers gauge",
                f"unidg_workers {workers}",
                "# HELP unidg_ready 1 when the bundle is loaded and warmed up.",
                "# TYPE unidg_ready gauge",
                f"unidg_ready {int(ready)}",
            ]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# The app


class RequestCounter:
    """Counts requests by path and status (plain ASGI: Starlette's BaseHTTPMiddleware would hide client
    disconnects from the synthesize endpoint). /v1/synthesize records its own status and latency."""

    KNOWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/v1/synthesize":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope["path"] if scope["path"] in self.KNOWN_PATHS else "other"
            self.metrics.observe_request(path, status, None)


async def read_body_limited(request: Any, limit: int) -> bytes:
    """The request body, refusing (413) more than ``limit`` bytes whether or not Content-Length is sent."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError as error:
            raise ServiceError(400, "bad_request", f"Content-Length {declared!r} is not an integer") from error
        if declared_bytes > limit:
            raise ServiceError(
                413,
                "too_large",
                f"the request body is {declared_bytes} bytes; this service accepts at most {limit} bytes "
                f"(--max-upload-mb {limit / 1048576:g})",
            )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ServiceError(
                413, "too_large", f"the request body exceeds {limit} bytes (--max-upload-mb {limit / 1048576:g})"
            )
    return bytes(body)


async def parse_multipart(headers: Any, body: bytes, max_part_bytes: int) -> dict[str, bytes | str]:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    content_type = headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"POST /v1/synthesize takes multipart/form-data (got {content_type or 'no content type'}); send the "
            f"files {list(UPLOAD_FIELDS)} and an optional JSON field 'params'",
        )

    async def stream() -> Any:
        yield body
        yield b""

    try:
        form = await MultiPartParser(headers, stream(), max_files=8, max_fields=8, max_part_size=max_part_bytes).parse()
    except MultiPartException as error:
        raise ServiceError(400, "bad_multipart", f"the multipart body cannot be parsed: {error.message}") from error
    fields: dict[str, bytes | str] = {}
    try:
        for key, value in form.multi_items():
            if key in fields:
                raise ServiceError(422, "invalid_input", f"field {key!r} is given more than once", key)
            if isinstance(value, UploadFile):
                fields[key] = await value.read()
            else:
                fields[key] = value
    finally:
        await form.close()
    return fields


def create_app(config: ServeConfig, factory: SynthesizerFactory | None = None) -> Any:
    """The FastAPI app. ``factory`` makes one synthesizer per worker (default: from ``config.bundle``)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    metrics = Metrics()
    pool = SynthesisPool(
        factory or bundle_synthesizer_factory(config),
        workers=config.workers,
        max_queue=config.max_queue,
        metrics=metrics,
        warmup=config.warmup,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        pool.start()
        try:
            yield
        finally:
            await run_in_threadpool(pool.stop)

    app = FastAPI(title="unidg", version=_package_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.config = config

    def error_response(error: ServiceError, request_id: str) -> Any:
        return JSONResponse(
            {**error.body(), "request_id": request_id},
            status_code=error.status,
            headers={**error.headers, "X-Request-ID": request_id},
        )

    def check_key(request: Any) -> None:
        if config.api_key is None:
            return
        given = request.headers.get(API_KEY_HEADER, "")
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            raise ServiceError(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header", API_KEY_HEADER)

    def takes_request(endpoint: Any) -> Any:
        # Annotations are strings here (postponed evaluation) and Request is not a module global: give FastAPI the
        # class itself so it injects the request.
        endpoint.__annotations__ = {**endpoint.__annotations__, "request": Request}
        return endpoint

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Any, error: Any) -> Any:
        # 404/405/...: the same JSON shape as every other error of this service.
        code = str(error.detail).lower().replace(" ", "_")
        return JSONResponse(
            {"error": code, "message": f"{request.method} {request.url.path}: {error.detail}"},
            status_code=error.status_code,
            headers=getattr(error, "headers", None),
        )

    app.add_middleware(RequestCounter, metrics=metrics)

    @app.get("/healthz")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Any:
        if pool.load_error is not None:
            return JSONResponse({"ready": False, "error": pool.load_error}, status_code=503)
        if not pool.ready:
            return JSONResponse(
                {"ready": False, "reason": "loading the bundle and warming up"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        return {"ready": True, "bundle": str(config.bundle), "workers": config.workers, "warmup_s": pool.ready_after_s}

    @app.get("/metrics")
    @takes_request
    async def prometheus(request: Any) -> Any:
        try:
            check_key(request)
        except ServiceError as error:
            return error_response(error, "")
        text = metrics.render(pool.ready, config.max_queue, config.workers)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/synthesize")
    @takes_request
    async def synthesize(request: Any) -> Any:
        started = time.monotonic()
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        job: Job | None = None
        try:
            check_key(request)
            if not pool.ready:
                raise ServiceError(
                    503,
                    "not_ready",
                    pool.load_error or "the bundle is still loading; retry shortly (see GET /readyz)",
                    headers={"Retry-After": "5"},
                )
            body = await read_body_limited(request, config.max_upload_bytes)
            fields = await parse_multipart(request.headers, body, max_part_bytes=64 * 1024)
            del body
            params = parse_params(_text_field(fields, "params"), config.max_steps)
            inputs = await run_in_threadpool(_decode_inputs, fields, config.max_image_pixels)
            check_inputs(inputs)
            job = Job(
                request=check_options(build_request(inputs, params, request_id), pool.settings),
                deadline=started + config.timeout_s,
                request_id=request_id,
            )
            del fields, inputs
            try:
                pool.submit(job)
            except QueueFull as error:
                raise ServiceError(
                    503,
                    "queue_full",
                    f"all {config.workers} worker(s) are busy and {config.max_queue} request(s) are waiting; "
                    "retry later",
                    headers={"Retry-After": str(_retry_after(metrics, config))},
                ) from error
            output = await wait_for_result(request, job, config.timeout_s)
            if output is None:
                metrics.count_error("client_gone")
                metrics.observe_request("/v1/synthesize", 499, time.monotonic() - started)
                return JSONResponse({"error": "client_gone"}, status_code=499)
        except ServiceError as error:
            metrics.count_error(error.code)
            metrics.observe_request("/v1/synthesize", error.status, time.monotonic() - started)
            return error_response(error, request_id)
        except SynthesisTimeout as error:
            metrics.count_error("timeout")
            metrics.observe_request("/v1/synthesize", 504, time.monotonic() - started)
            wrapped = ServiceError(
                504, "timeout", f"{error}; the synthesis was cancelled (limit {config.timeout_s:g} s)"
            )
            return error_response(wrapped, request_id)
        except InputError as error:  # the runtime's own checks (e.g. a mask too small for the crop)
            metrics.count_error("invalid_input")
            metrics.observe_request("/v1/synthesize", 422, time.monotonic() - started)
            field_name = FIELD_OF_INPUT.get(error.name, error.name)
            return error_response(ServiceError(422, "invalid_input", str(error), field_name), request_id)
        except asyncio.CancelledError:
            if job is not None:
                job.cancel.set()  # the client went away: stop the synthesis at its next step
            raise
        except Exception as error:
            logger.exception("request %s failed", request_id)
            metrics.count_error("internal")
            metrics.observe_request("/v1/synthesize", 500, time.monotonic() - started)
            wrapped = ServiceError(500, "internal", f"synthesis failed: {type(error).__name__}: {error}")
            return error_response(wrapped, request_id)
        elapsed = time.monotonic() - started
        metrics.observe_request("/v1/synthesize", 200, elapsed)
        return JSONResponse(
            {
                "request_id": request_id,
                "width": output.width,
                "height": output.height,
                "image_png": base64.b64encode(output.image_png).decode("ascii"),
                "mask_png": base64.b64encode(output.mask_png).decode("ascii"),
                "metadata": output.metadata,
                "timing": {"synthesis_s": round(output.synthesis_s, 4), "total_s": round(elapsed, 4)},
            },
            headers={"X-Request-ID": request_id},
        )

    return app


async def wait_for_result(request: Any, job: Job, timeout_s: float) -> SynthesisOutput | None:
    """The job's output; None when the client disconnected first. Either way a job no one waits for is cancelled:
    dropped from the queue, or stopped at its next step through the progress callback."""
    waiting = asyncio.wrap_future(job.future)
    try:
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                raise SynthesisTimeout(f"no result within --timeout {timeout_s:g} s")
            done, _ = await asyncio.wait({waiting}, timeout=min(remaining, DISCONNECT_POLL_S))
            if done:
                return waiting.result()
            if await request.is_disconnected():
                return None
    finally:
        if not waiting.done():
            job.cancel.set()
            waiting.cancel()


def _text_field(fields: dict[str, bytes | str], name: str) -> str | None:
    value = fields.get(name)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ServiceError(400, "invalid_params", f"{name} is not UTF-8 text", name) from error
    return value


def _decode_inputs(fields: dict[str, bytes | str], max_pixels: int) -> SynthesisInputs:
    unknown = sorted(set(fields) - set(UPLOAD_FIELDS) - {"params"})
    if unknown:
        raise ServiceError(
            422,
            "invalid_input",
            f"unknown field(s) {unknown}; expected files {list(UPLOAD_FIELDS)} and an optional 'params'",
            unknown[0],
        )
    arrays = {}
    for field_name, name in UPLOAD_FIELDS.items():
        data = fields.get(field_name)
        if data is None:
            raise ServiceError(
                422, "missing_input", f"the {name} is missing: send it as file field '{field_name}'", field_name
            )
        if isinstance(data, str):
            raise ServiceError(
                422,
                "invalid_input",
                f"{field_name} must be an uploaded file (PNG or JPEG), not a text field",
                field_name,
            )
        arrays[field_name] = decode_upload(data, field_name, max_pixels, as_mask=field_name.endswith("mask"))
    return SynthesisInputs(arrays["reference"], arrays["reference_mask"], arrays["source"], arrays["mask"])


def _retry_after(metrics: Metrics, config: ServeConfig) -> int:
    """Seconds a client should wait: about one synthesis per queued request per worker, at least 1."""
    with metrics._lock:
        mean = metrics.synthesis.sum / metrics.synthesis.total if metrics.synthesis.total else 1.0
    return max(1, math.ceil(mean * max(config.max_queue, 1) / config.workers))


def _package_version() -> str:
    from unidg import __version__

    return __version__


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Run the service in the foreground (uvicorn, one process; synthesis parallelism is ``config.workers``)."""
    import uvicorn

    app = create_app(config)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, workers=1, access_log=False)


def api_key_from_env(variable: str | None) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"--api-key-env {variable}: the environment variable {variable} is unset or empty")
    return value
