"""The FastAPI app of ``unidg serve`` (the only module of the service that imports FastAPI/Starlette).

Request path of ``POST /v1/synthesize``: Host/key/request-id checks → 503 at once when the service is full, before
the body is read → body (size, time and rate limited; its bytes drawn from the upload budget as they arrive) →
admission (a place among ``workers + max_queue``) → multipart → params → decode and check the uploads (at most
``workers`` at a time, in threads) → queue → a worker decodes again and synthesizes → JSON with base64 PNGs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from unidg import __version__
from unidg.core.images import InputError
from unidg.runtime.serve.config import API_KEY_HEADER, ServeConfig, host_header_is_loopback
from unidg.runtime.serve.metrics import Metrics
from unidg.runtime.serve.pool import (
    Job,
    QueueFull,
    SynthesisOutput,
    SynthesisPool,
    SynthesisTimeout,
    SynthesizerFactory,
    UploadBudget,
    bundle_synthesizer_factory,
)
from unidg.runtime.serve.protocol import (
    UPLOAD_FIELDS,
    ServiceError,
    SynthesisParams,
    build_request,
    check_options,
    decode_inputs,
    input_error,
    parse_params,
    prompt_field,
    release_frames,
    request_error,
    request_id_from,
    text_field,
    upload_files,
)
from unidg.runtime.synthesizer import RequestError

logger = logging.getLogger("unidg.serve")

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
MAX_TEXT_PART_BYTES = 64 * 1024  # the params and prompt fields


class ClientGone(Exception):
    """The client closed the connection before its request was answered."""


def json_error(error: ServiceError, request_id: str = "") -> JSONResponse:
    headers = {**error.headers}
    if request_id:
        headers["X-Request-ID"] = request_id
    return JSONResponse({**error.body(), "request_id": request_id}, status_code=error.status, headers=headers)


class RequestGuard:
    """Plain ASGI middleware (Starlette's BaseHTTPMiddleware would hide client disconnects from the endpoint): refuses
    a Host that is not a loopback name on a keyless service (DNS rebinding), and counts requests by path and status.
    /v1/synthesize records its own status and latency."""

    KNOWN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

    def __init__(self, app: Any, metrics: Metrics, config: ServeConfig) -> None:
        self.app = app
        self.metrics = metrics
        self.config = config

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in self.KNOWN_PATHS | {"/v1/synthesize"} else "other"
        if self.config.checks_host_header:
            host = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), None)
            if not host_header_is_loopback(host):
                error = ServiceError(
                    400,
                    "invalid_host",
                    "this service listens on loopback without an API key and answers only requests addressed to "
                    "localhost, 127.0.0.1 or [::1]",
                    "Host",
                )
                self.metrics.count_error(error.code)
                self.metrics.observe_request(path, error.status, None)
                await json_error(error)(scope, receive, send)
                return
        if path == "/v1/synthesize":
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
            self.metrics.observe_request(path, status, None)


async def read_body_limited(request: Any, config: ServeConfig, budget: UploadBudget, reserved: list[int]) -> bytes:
    """The request body, refusing (413) more than ``--max-upload-mb`` whether or not Content-Length is sent; (503) a
    body the upload budget cannot hold, its bytes reserved as they arrive and counted in ``reserved[0]`` (the caller
    gives them back); (408) a body that does not arrive within ``body_timeout_s``, or that after the head timeout's
    grace arrives slower than ``min_body_rate_kib_s``. A client that disconnects meanwhile raises ClientGone."""
    limit = config.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError as error:
            raise ServiceError(400, "bad_request", f"Content-Length {declared[:40]!r} is not an integer") from error
        if declared_bytes > limit:
            raise ServiceError(
                413,
                "too_large",
                f"the request body is {declared_bytes} bytes; this service accepts at most {limit} bytes "
                f"(--max-upload-mb {limit / 1048576:g})",
            )
        if declared_bytes > budget.free:
            raise uploads_full(config)
    started = time.monotonic()
    min_rate = config.min_body_rate_kib_s * 1024.0
    body = bytearray()
    chunks = request.stream().__aiter__()
    try:
        while True:
            now = time.monotonic()
            by_rate = started + config.header_timeout_s + len(body) / min_rate
            deadline = min(started + config.body_timeout_s, by_rate)
            try:
                async with asyncio.timeout(max(deadline - now, 0.0)):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                break
            except TimeoutError as error:
                reason = (
                    f"the request body did not arrive within {config.body_timeout_s:g} s"
                    if deadline < by_rate
                    else f"the request body arrived slower than {config.min_body_rate_kib_s:g} KiB/s "
                    f"({len(body)} bytes in {now - started:.1f} s)"
                )
                raise ServiceError(408, "request_timeout", reason, headers={"Connection": "close"}) from error
            if len(body) + len(chunk) > limit:
                raise ServiceError(
                    413, "too_large", f"the request body exceeds {limit} bytes (--max-upload-mb {limit / 1048576:g})"
                )
            if not budget.reserve(len(chunk)):
                raise uploads_full(config)
            reserved[0] += len(chunk)
            body += chunk
    except ClientDisconnect as error:
        raise ClientGone from error
    return bytes(body)


def uploads_full(config: ServeConfig) -> ServiceError:
    return ServiceError(
        503,
        "queue_full",
        f"the service holds its upload budget of {config.upload_budget_bytes} bytes "
        f"((workers + max-queue) x --max-upload-mb) already; retry later",
        headers={"Retry-After": "1", "Connection": "close"},
    )


async def parse_multipart(headers: Any, body: bytes) -> dict[str, bytes | str]:
    content_type = headers.get("content-type", "")
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":  # media types are case-insensitive
        raise ServiceError(
            415,
            "unsupported_media_type",
            f"POST /v1/synthesize takes multipart/form-data (got {content_type[:100] or 'no content type'}); send "
            f"the files {list(UPLOAD_FIELDS)}, an optional JSON field 'params' and (UniDG-Text) a text field 'prompt'",
        )

    async def stream() -> Any:
        yield body
        yield b""

    try:
        parser = MultiPartParser(headers, stream(), max_files=8, max_fields=8, max_part_size=MAX_TEXT_PART_BYTES)
        form = await parser.parse()
    except MultiPartException as error:
        raise ServiceError(400, "bad_multipart", f"the multipart body cannot be parsed: {error.message}") from error
    fields: dict[str, bytes | str] = {}
    try:
        for key, value in form.multi_items():
            if key in fields:
                raise ServiceError(422, "invalid_input", f"field {key!r} is given more than once", key)
            fields[key] = await value.read() if isinstance(value, UploadFile) else value
    finally:
        await form.close()
    return fields


def checked_params(
    files: dict[str, bytes], params: SynthesisParams, pool: SynthesisPool, config: ServeConfig, request_id: str
) -> SynthesisParams:
    """Decode and check the uploads and the options as the worker will (errors now, not after the queue); returns the
    params with every default filled and the seed drawn. The decoded pictures are dropped on return."""
    try:
        request = build_request(decode_inputs(files, config.max_image_pixels), params, request_id)
        checked = check_options(request, pool.check)
    except Exception as error:
        release_frames(error)  # the decoded pictures go when the refusal is sent, not at the next collection
        raise
    return SynthesisParams(
        seed=checked.seed,
        steps=checked.steps,
        guidance=checked.guidance,
        category=checked.category,
        prompt=params.prompt,  # as sent: the worker's synthesizer fills a text bundle's default again
    )


def redact_paths(text: str, config: ServeConfig) -> str:
    """A message for clients without the server's folders in it (the bundle folder keeps only its name)."""
    bundle = Path(config.bundle)
    for form in {str(bundle.resolve()), str(bundle.absolute()), str(bundle)}:
        if form not in (".", ""):
            text = text.replace(form, bundle.name or "<bundle>")
    return text


@dataclass
class Service:
    """What the routes of one app share (``app.state.service``): its config, worker pool, metrics, the slots of
    concurrent decodes before the queue and the upload budget."""

    config: ServeConfig
    pool: SynthesisPool
    metrics: Metrics
    decode_slots: asyncio.Semaphore
    budget: UploadBudget


def create_app(config: ServeConfig, factory: SynthesizerFactory | None = None) -> Any:
    """The FastAPI app. ``factory`` makes one synthesizer per worker (default: from ``config.bundle``)."""
    metrics = Metrics()
    pool = SynthesisPool(
        factory or bundle_synthesizer_factory(config),
        workers=config.workers,
        max_queue=config.max_queue,
        metrics=metrics,
        warmup=config.warmup,
        max_image_pixels=config.max_image_pixels,
    )
    app = FastAPI(title="unidg", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = Service(
        config, pool, metrics, asyncio.Semaphore(config.workers), UploadBudget(config.upload_budget_bytes)
    )
    app.state.pool = pool
    app.state.metrics = metrics
    app.state.config = config
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_middleware(RequestGuard, metrics=metrics, config=config)
    app.get("/healthz")(healthz)
    app.get("/readyz")(readyz)
    app.get("/metrics")(prometheus)
    app.post("/v1/synthesize")(synthesize)
    return app


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> Any:
    pool = app.state.service.pool
    pool.start()
    try:
        yield
    finally:
        await run_in_threadpool(pool.stop)


def check_key(request: Request, config: ServeConfig) -> None:
    if config.api_key is None:
        return
    given = request.headers.get(API_KEY_HEADER, "")
    if not hmac.compare_digest(given.encode(), config.api_key.encode()):
        raise ServiceError(401, "unauthorized", f"missing or wrong {API_KEY_HEADER} header", API_KEY_HEADER)


async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    # 404/405/...: the same JSON shape as every other error of this service.
    code = str(error.detail).lower().replace(" ", "_")
    return JSONResponse(
        {"error": code, "message": f"{request.method} {request.url.path}: {error.detail}"},
        status_code=error.status_code,
        headers=getattr(error, "headers", None),
    )


async def healthz() -> Any:
    return {"status": "ok"}


async def readyz(request: Request) -> Any:
    service: Service = request.app.state.service
    pool, config = service.pool, service.config
    if pool.load_error is not None:
        return JSONResponse({"ready": False, "error": redact_paths(pool.load_error, config)}, status_code=503)
    if not pool.ready:
        return JSONResponse(
            {"ready": False, "reason": "loading the bundle and warming up"},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return {
        "ready": True,
        "bundle_fingerprint": pool.bundle_fingerprint,
        "workers": config.workers,
        "warmup_s": pool.ready_after_s,
    }


async def prometheus(request: Request) -> Any:
    service: Service = request.app.state.service
    config = service.config
    try:
        check_key(request, config)
    except ServiceError as error:
        return json_error(error)
    text = service.metrics.render(service.pool.ready, config.max_queue, config.workers)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def synthesize(request: Request) -> Any:
    service: Service = request.app.state.service
    config, pool, metrics, budget = service.config, service.pool, service.metrics, service.budget
    started = time.monotonic()
    request_id = ""
    job: Job | None = None
    admission = None
    reserved = [0]  # body bytes drawn from the upload budget

    def failed(error: ServiceError) -> JSONResponse:
        error.message = redact_paths(error.message, config)  # e.g. a runtime message naming the bundle folder
        metrics.count_error(error.code)
        metrics.observe_request("/v1/synthesize", error.status, time.monotonic() - started)
        return json_error(error, request_id)

    try:
        request_id = request_id_from(request.headers.get("x-request-id"))
        check_key(request, config)
        if not pool.ready:
            raise ServiceError(
                503,
                "not_ready",
                redact_paths(pool.load_error, config)
                if pool.load_error
                else "the bundle is still loading; retry shortly (see GET /readyz)",
                headers={"Retry-After": "5"},
            )
        if not pool.has_room():  # a full service refuses before reading the body: it costs nothing more
            raise queue_full(metrics, config)
        body = await read_body_limited(request, config, budget, reserved)
        try:
            admission = pool.admit()  # after the body: a slow upload holds no place
        except QueueFull as error:
            raise queue_full(metrics, config) from error
        fields = await parse_multipart(request.headers, body)
        del body
        params = parse_params(text_field(fields, "params"), config.max_steps)
        params = dataclasses.replace(params, prompt=prompt_field(fields))
        files = upload_files(fields)
        async with service.decode_slots:
            params = await run_in_threadpool(checked_params, files, params, pool, config, request_id)
        queued = Job(
            files=files,
            params=params,
            deadline=started + config.timeout_s,
            admission=admission,
            request_id=request_id,
        )
        del fields
        pool.submit(queued)
        job = queued
        output = await wait_for_result(request, job, config.timeout_s)
        if output is None:
            raise ClientGone
    except ServiceError as error:
        return failed(error)
    except ClientGone:
        metrics.count_error("client_gone")
        metrics.observe_request("/v1/synthesize", 499, time.monotonic() - started)
        return JSONResponse({"error": "client_gone", "request_id": request_id}, status_code=499)
    except SynthesisTimeout as error:
        return failed(
            ServiceError(504, "timeout", f"{error}; the synthesis was cancelled (limit {config.timeout_s:g} s)")
        )
    except InputError as error:  # the runtime's own checks (e.g. a mask too small for the crop)
        return failed(input_error(error))
    except RequestError as error:  # an option or prompt the worker's synthesizer refused
        return failed(request_error(error))
    except asyncio.CancelledError:
        if job is not None:
            job.cancel.set()  # the client went away: stop the synthesis at its next step
        raise
    except Exception as error:
        # Details (which may name server files) go to the log, under the request id the client was given.
        logger.exception("request %s failed", request_id)
        return failed(
            ServiceError(500, "internal", f"synthesis failed ({type(error).__name__}); the server log has the details")
        )
    finally:
        if admission is not None and job is None:
            admission.release()  # never reached the queue; the worker releases queued ones
        budget.release(reserved[0])
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


def queue_full(metrics: Metrics, config: ServeConfig) -> ServiceError:
    return ServiceError(
        503,
        "queue_full",
        f"all {config.workers} worker(s) are busy and {config.max_queue} request(s) are waiting; retry later",
        headers={"Retry-After": str(_retry_after(metrics, config))},
    )


def _retry_after(metrics: Metrics, config: ServeConfig) -> int:
    """Seconds a client should wait: about one synthesis per queued request per worker, at least 1."""
    return max(1, math.ceil(metrics.mean_synthesis_s() * max(config.max_queue, 1) / config.workers))
