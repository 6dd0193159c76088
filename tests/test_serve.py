"""HTTP service (`unidg serve`): load at concurrency with bounded memory, queue limits, timeouts, malformed input.

The server runs on 127.0.0.1 only, on a free port: as a child process (`python -m unidg.cli serve`, the real command)
for the load and abuse tests, or as uvicorn in a thread for the queue/timeout mechanics. Those mechanics need a
synthesis that lasts long enough to fill a queue; they wrap the real synthesizer so each denoising step also sleeps a
few milliseconds (the images are still the runtime's own).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image
from surface_fixtures import (
    LONG_PROMPT,
    OTHER_PROMPT,
    PROMPT,
    masked_equal_outside,
    nano_bundle,
    sample_path,
    text_bundle,
    toy_bundle,
)

from unidg.runtime.serve import ServeConfig, ServiceError, create_app, parse_params
from unidg.runtime.serve_bench import fire
from unidg.runtime.serve_client import (
    encode_multipart,
    free_loopback_port,
    get,
    png_bytes,
    post,
    rss_mib,
    sample_inputs,
    start_server,
    stop_server,
    wait_ready,
)
from unidg.runtime.synthesizer import DefectSynthesizer

API_KEY = "station-key-7f3a"
KEY = {"X-API-Key": API_KEY}
# The recorded figure is 200 requests at concurrency 8 (`unidg bench serve`, docs/service.md); the test sends fewer to
# stay fast on two shared cores (UNIDG_SERVE_TEST_REQUESTS=200 runs the full count).
LOAD_REQUESTS = int(os.environ.get("UNIDG_SERVE_TEST_REQUESTS", "64"))
LOAD_CONCURRENCY = 8
RSS_GROWTH_LIMIT_MIB = 64.0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The toy bundle, for the mechanics tests (they slow every step down on purpose)."""
    return toy_bundle(tmp_path_factory.mktemp("serve") / "bundle")


@pytest.fixture(scope="module")
def server(tmp_path_factory, pytestconfig):
    """`unidg serve` on the exported nano bundle in a child process: 2 workers, API key, 1 MiB upload limit."""
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = ["--workers", "2", "--max-queue", "32", "--max-upload-mb", "1", "--threads", "1"]
    args += ["--api-key-env", "UNIDG_TEST_API_KEY", "--timeout", "60"]
    bundle = nano_bundle(pytestconfig)
    process, url = start_server(bundle, extra_args=args, env={"UNIDG_TEST_API_KEY": API_KEY}, log_path=log)
    try:
        wait_ready(url, process, timeout=120)
        yield url, process
    finally:
        code = stop_server(process)
        # uvicorn re-raises SIGTERM after a graceful shutdown; anything else means the server died.
        assert code in (0, -15), f"server exited with {code}: {log.read_text()[-2000:]}"


def _decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def _inputs_arrays(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(io.BytesIO(data))) for name, data in files.items()}


# ---------------------------------------------------------------------------------------------------- the real command
def test_health_ready_and_metrics(server):
    url, _ = server
    assert get(url, "/healthz").status == 200
    ready = get(url, "/readyz")
    assert ready.status == 200 and ready.json()["ready"] is True
    assert get(url, "/metrics").status == 401  # metrics need the key when one is set
    metrics = get(url, "/metrics", headers=KEY)
    assert metrics.status == 200
    text = metrics.body.decode()
    for name in ("unidg_requests_total", "unidg_request_duration_seconds_bucket", "unidg_queue_depth", "unidg_ready 1"):
        assert name in text


def test_synthesize_returns_the_image_mask_and_metadata(server):
    url, _ = server
    files = sample_inputs(96, seed=3)
    body, content_type = encode_multipart(files, {"params": json.dumps({"seed": 11, "steps": 3})})
    reply = post(url, body, content_type, headers={**KEY, "X-Request-ID": "station-4-job-17"})
    assert reply.status == 200, reply.body[:500]
    data = reply.json()
    assert data["request_id"] == "station-4-job-17" and reply.headers["x-request-id"] == "station-4-job-17"
    image, mask = _decode_png(data["image_png"]), _decode_png(data["mask_png"]) > 127
    source = _inputs_arrays(files)["source"]
    target = _inputs_arrays(files)["mask"] > 127
    assert image.shape == source.shape and mask.shape == source.shape[:2]
    assert masked_equal_outside(image, source, mask)
    assert mask[target].all() and not mask.all()
    assert not np.array_equal(image[mask], source[mask])
    assert data["metadata"]["seed"] == 11 and data["metadata"]["steps"] == 3
    # Same seed, same output; no seed: the default seed of every surface (0), reported.
    again = post(url, body, content_type, headers=KEY).json()
    assert again["image_png"] == data["image_png"]
    body, content_type = encode_multipart(files)
    assert post(url, body, content_type, headers=KEY).json()["metadata"]["seed"] == 0


def test_load_at_concurrency_8_all_succeed_with_bounded_memory(server):
    url, process = server
    files = sample_inputs(96)
    params = {"steps": 4, "seed": 0}
    fire(url, 16, LOAD_CONCURRENCY, files, params, headers=KEY)  # warm the HTTP path and the allocator
    before = rss_mib(process.pid)
    replies, wall = fire(url, LOAD_REQUESTS, LOAD_CONCURRENCY, files, params, headers=KEY)
    after = rss_mib(process.pid)
    statuses = {r.status for r in replies}
    latencies = np.array([r.seconds for r in replies])
    p50, p95 = np.percentile(latencies, 50), np.percentile(latencies, 95)
    print(
        f"\n{LOAD_REQUESTS} requests at concurrency {LOAD_CONCURRENCY}: {wall:.2f} s, p50 {p50 * 1000:.1f} ms, "
        f"p95 {p95 * 1000:.1f} ms; server RSS {before:.1f} MiB before -> {after:.1f} MiB after"
    )
    assert len(replies) == LOAD_REQUESTS and statuses == {200}, [r.body[:200] for r in replies if r.status != 200][:3]
    first = replies[0].json()["image_png"]
    assert all(r.json()["image_png"] == first for r in replies[:: max(LOAD_REQUESTS // 10, 1)])
    if before is not None:
        assert after - before < RSS_GROWTH_LIMIT_MIB, f"RSS grew {after - before:.1f} MiB over {LOAD_REQUESTS} requests"
    assert process.poll() is None


def _multipart_with_duplicate(files: dict[str, bytes]) -> tuple[bytes, str]:
    body, content_type = encode_multipart(files)
    boundary = content_type.split("boundary=")[1]
    extra = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="source"; filename="s.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + files["source"]
        + b"\r\n"
    )
    return extra + body, content_type


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _malformed_cases() -> list[tuple[str, dict]]:
    files = sample_inputs(64, seed=1)
    arrays = _inputs_arrays(files)
    empty_mask = png_bytes(np.zeros((64, 64), dtype=np.uint8))
    full_mask = png_bytes(np.full((64, 64), 255, dtype=np.uint8))
    small_mask = png_bytes(np.full((32, 40), 255, dtype=np.uint8))
    rgba = np.dstack([arrays["reference"], np.full((64, 64), 128, dtype=np.uint8)])
    giant_mask = io.BytesIO()
    Image.new("L", (5000, 5000)).save(giant_mask, format="PNG")

    def with_files(**replace: bytes | None) -> dict[str, bytes]:
        merged = {**files, **replace}
        return {k: v for k, v in merged.items() if v is not None}

    def form(params: object = None, **replace: bytes | None) -> dict:
        fields = None if params is None else {"params": params if isinstance(params, str) else json.dumps(params)}
        body, content_type = encode_multipart(with_files(**replace), fields)
        return {"body": body, "content_type": content_type}

    duplicate_body, duplicate_type = _multipart_with_duplicate(files)
    text_field_body, text_field_type = encode_multipart(with_files(reference=None), {"reference": "not a file"})
    extra_body, extra_type = encode_multipart({**files, "thumbnail": files["source"]})
    return [
        ("missing reference", {**form(reference=None), "status": 422, "field": "reference"}),
        ("missing reference mask", {**form(reference_mask=None), "status": 422, "field": "reference_mask"}),
        ("missing source", {**form(source=None), "status": 422, "field": "source"}),
        ("missing mask", {**form(mask=None), "status": 422, "field": "mask"}),
        ("empty source file", {**form(source=b""), "status": 422, "field": "source"}),
        ("reference is text", {**form(reference=b"hello, not a picture"), "status": 422, "field": "reference"}),
        ("truncated PNG", {**form(source=files["source"][:60]), "status": 422, "field": "source"}),
        ("mask of another size", {**form(mask=small_mask), "status": 422, "field": "mask"}),
        ("empty target mask", {**form(mask=empty_mask), "status": 422, "field": "mask"}),
        ("full target mask", {**form(mask=full_mask), "status": 422, "field": "mask"}),
        ("empty reference mask", {**form(reference_mask=empty_mask), "status": 422, "field": "reference_mask"}),
        ("translucent reference", {**form(reference=png_bytes(rgba)), "status": 422, "field": "reference"}),
        ("BMP source", {**form(source=_encoded(arrays["source"], "BMP")), "status": 422, "field": "source"}),
        ("TIFF mask", {**form(mask=_encoded(arrays["mask"], "TIFF")), "status": 422, "field": "mask"}),
        ("5000x5000 mask", {**form(mask=giant_mask.getvalue()), "status": 413, "field": "mask"}),
        ("reference as text field", {"body": text_field_body, "content_type": text_field_type, "status": 422}),
        ("duplicate source", {"body": duplicate_body, "content_type": duplicate_type, "status": 422}),
        ("unknown file field", {"body": extra_body, "content_type": extra_type, "status": 422, "field": "thumbnail"}),
        ("params not JSON", {**form("{steps: 4"), "status": 400, "field": "params"}),
        ("params a list", {**form("[1, 2]"), "status": 400, "field": "params"}),
        ("unknown param", {**form({"strength": 1}), "status": 422, "field": "params.strength"}),
        ("zero steps", {**form({"steps": 0}), "status": 422, "field": "params.steps"}),
        ("too many steps", {**form({"steps": 10_000}), "status": 422, "field": "params.steps"}),
        ("fractional steps", {**form({"steps": 2.5}), "status": 422, "field": "params.steps"}),
        ("negative seed", {**form({"seed": -1}), "status": 422, "field": "params.seed"}),
        ("seed as text", {**form({"seed": "7"}), "status": 422, "field": "params.seed"}),
        ("NaN guidance", {**form('{"guidance": NaN}'), "status": 422, "field": "params.guidance"}),
        ("guidance as text", {**form({"guidance": "high"}), "status": 422, "field": "params.guidance"}),
        ("unknown category", {**form({"category": "sparkles"}), "status": 422, "field": "params.category"}),
        ("JSON body", {"body": b'{"reference": "x"}', "content_type": "application/json", "status": 415}),
        ("broken multipart", {"body": b"--nope\r\n\r\n", "content_type": "multipart/form-data", "status": 400}),
        ("body over the limit", {**form(source=b"\x89PNG" + os.urandom(1_200_000)), "status": 413}),
    ]


def test_malformed_requests_get_4xx_naming_the_problem_and_the_server_survives(server):
    url, process = server
    cases = _malformed_cases()
    assert len(cases) >= 20
    for name, case in cases:
        reply = post(url, case["body"], case["content_type"], headers=KEY)
        assert reply.status == case["status"], f"{name}: {reply.status} {reply.body[:300]!r}"
        body = reply.json()
        assert body["error"] and len(body["message"]) > 10, name
        if "field" in case:
            assert body.get("field") == case["field"], f"{name}: {body}"
    # Wrong method, no key, wrong key, chunked upload over the limit.
    assert get(url, "/v1/synthesize", headers=KEY).status == 405
    files = sample_inputs(64)
    body, content_type = encode_multipart(files)
    for headers in ({}, {"X-API-Key": "wrong"}):
        reply = post(url, body, content_type, headers=headers)
        assert reply.status == 401 and reply.json()["field"] == "X-API-Key"
    assert _post_chunked(url, b"x" * 1_300_000, content_type) == 413
    # Still alive and still serving.
    assert process.poll() is None
    assert get(url, "/healthz").status == 200
    assert post(url, body, content_type, headers=KEY).status == 200
    metrics = get(url, "/metrics", headers=KEY).body.decode()
    assert 'unidg_requests_total{path="/v1/synthesize",status="422"}' in metrics


def _post_chunked(url: str, payload: bytes, content_type: str) -> int:
    """POST with Transfer-Encoding: chunked (no Content-Length), as a streaming client would."""
    import http.client
    import urllib.parse

    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    try:
        chunks = (payload[i : i + 65536] for i in range(0, len(payload), 65536))
        connection.request(
            "POST", "/v1/synthesize", body=chunks, headers={"Content-Type": content_type, **KEY}, encode_chunked=True
        )
        response = connection.getresponse()
        response.read()
        return response.status
    except (BrokenPipeError, ConnectionResetError):
        return 413  # the server answered 413 and closed before the whole body was sent
    finally:
        connection.close()


def test_public_bind_without_api_key_is_refused(bundle):
    with pytest.raises(ValueError, match="refusing to bind to 0.0.0.0.*--api-key-env"):
        ServeConfig(bundle=str(bundle), host="0.0.0.0")
    ServeConfig(bundle=str(bundle), host="0.0.0.0", api_key="secret")  # allowed with a key (not bound here)
    ServeConfig(bundle=str(bundle), host="::1")
    result = subprocess.run(
        [sys.executable, "-m", "unidg.cli", "serve", "--bundle", str(bundle), "--host", "192.168.0.10"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "refusing to bind to 192.168.0.10" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "unidg.cli", "serve", "--bundle", "/nonexistent/bundle", "--port", "9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "/nonexistent/bundle does not exist" in result.stderr


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"steps": true}', "params.steps"),
        ('{"seed": 9223372036854775808}', "params.seed"),
        ('{"guidance": -1}', "params.guidance"),
        ('{"category": ""}', "params.category"),
        ('"steps"', "params"),
    ],
)
def test_params_are_checked_field_by_field(text, field):
    with pytest.raises(ServiceError) as caught:
        parse_params(text, max_steps=50)
    assert caught.value.field == field and caught.value.status in (400, 422)


def test_params_defaults_and_values():
    assert parse_params(None, 50).steps is None
    params = parse_params('{"seed": 5, "steps": 50, "guidance": 3, "category": "scratch"}', 50)
    assert (params.seed, params.steps, params.guidance, params.category) == (5, 50, 3.0, "scratch")


# ------------------------------------------------------------------------------------- queue and timeout mechanics
class SlowedSynthesizer:
    """The real synthesizer, with every denoising step made ``delay`` seconds longer (through its progress hook)."""

    def __init__(self, synthesizer: DefectSynthesizer, delay: float, gate: threading.Event | None = None) -> None:
        self.synthesizer = synthesizer
        self.delay = delay
        self.gate = gate

    @property
    def settings(self):
        return self.synthesizer.settings

    def generate(self, request, progress=None):
        if self.gate is not None:
            self.gate.wait(30)

        def slow(step: int, total: int) -> bool:
            time.sleep(self.delay)
            return True if progress is None else progress(step, total) is not False

        return self.synthesizer.generate(request, progress=slow)


@contextlib.contextmanager
def serve_in_thread(app, config: ServeConfig | None = None):
    """The app under the service's own uvicorn settings (timeouts, connection limits) on a free loopback port."""
    import uvicorn

    from unidg.runtime.serve.server import uvicorn_config

    port = free_loopback_port()
    config = dataclasses.replace(config or app.state.config, host="127.0.0.1", port=port)
    server = uvicorn.Server(uvicorn_config(app, config, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _metric(url: str, name: str) -> float:
    for line in get(url, "/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_full_queue_answers_503_and_timeouts_cancel_the_synthesis(bundle):
    config = ServeConfig(bundle=str(bundle), workers=1, max_queue=1, timeout_s=2.0, max_steps=1000)
    app = create_app(config, factory=lambda: SlowedSynthesizer(DefectSynthesizer.from_bundle(bundle), 0.01))
    files = sample_inputs(64)
    slow_body, content_type = encode_multipart(files, {"params": json.dumps({"steps": 1000})})  # ~10 s of steps
    fast_body, fast_type = encode_multipart(files, {"params": json.dumps({"steps": 2})})
    with serve_in_thread(app) as url:
        wait_ready(url, timeout=60)
        replies = {}

        def send(name: str) -> None:
            replies[name] = post(url, slow_body, content_type)

        running = threading.Thread(target=send, args=("running",))
        running.start()
        _wait_for(lambda: _metric(url, "unidg_inflight") == 1)
        queued = threading.Thread(target=send, args=("queued",))
        queued.start()
        _wait_for(lambda: _metric(url, "unidg_queue_depth") == 1)

        full = post(url, fast_body, fast_type)
        assert full.status == 503 and full.json()["error"] == "queue_full", full.body
        assert int(full.headers["retry-after"]) >= 1

        running.join(30)
        queued.join(30)
        for name in ("running", "queued"):
            assert replies[name].status == 504 and replies[name].json()["error"] == "timeout", replies[name].body
            assert replies[name].seconds < 4.0  # answered at the deadline, not after 1000 steps
        # The running synthesis was stopped at its next step: the worker is free again at once.
        _wait_for(lambda: _metric(url, "unidg_inflight") == 0, timeout=2.0)
        after = post(url, fast_body, fast_type)
        assert after.status == 200 and after.seconds < 2.0, after.body[:300]
        metrics = get(url, "/metrics").body.decode()
        assert 'unidg_errors_total{kind="queue_full"} 1' in metrics
        assert 'unidg_errors_total{kind="timeout"} 2' in metrics
        assert 'unidg_requests_total{path="/v1/synthesize",status="503"} 1' in metrics


def test_not_ready_until_loaded_and_warmed_up(bundle):
    gate = threading.Event()
    config = ServeConfig(bundle=str(bundle), workers=1)
    app = create_app(config, factory=lambda: SlowedSynthesizer(DefectSynthesizer.from_bundle(bundle), 0.0, gate))
    body, content_type = encode_multipart(sample_inputs(64))
    with serve_in_thread(app) as url:
        assert get(url, "/healthz").status == 200
        reply = get(url, "/readyz")
        assert reply.status == 503 and "retry-after" in reply.headers  # the warm-up run waits for the gate
        early = post(url, body, content_type)
        assert early.status == 503 and early.json()["error"] == "not_ready"
        gate.set()
        wait_ready(url, timeout=30)
        assert post(url, body, content_type).status == 200


def test_a_bundle_that_cannot_load_is_reported_by_readyz(tmp_path):
    config = ServeConfig(bundle=str(tmp_path / "missing-bundle"), workers=1)
    with serve_in_thread(create_app(config)) as url:
        _wait_for(lambda: "error" in get(url, "/readyz").json())
        reply = get(url, "/readyz")
        assert reply.status == 503 and "missing-bundle does not exist" in reply.json()["error"]
        assert get(url, "/healthz").status == 200
        body, content_type = encode_multipart(sample_inputs(64))
        failed = post(url, body, content_type)
        assert failed.status == 503 and "missing-bundle" in failed.json()["message"]


def test_a_client_that_disconnects_frees_its_worker(bundle):
    import socket
    import urllib.parse

    config = ServeConfig(bundle=str(bundle), workers=1, max_queue=1, timeout_s=30.0, max_steps=1000)
    app = create_app(config, factory=lambda: SlowedSynthesizer(DefectSynthesizer.from_bundle(bundle), 0.01))
    body, content_type = encode_multipart(sample_inputs(64), {"params": json.dumps({"steps": 1000})})
    with serve_in_thread(app) as url:
        wait_ready(url, timeout=60)
        parsed = urllib.parse.urlsplit(url)
        client = socket.create_connection((parsed.hostname, parsed.port))
        head = f"POST /v1/synthesize HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
        client.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        _wait_for(lambda: _metric(url, "unidg_inflight") == 1)
        client.close()  # about 10 s of steps left
        _wait_for(lambda: _metric(url, "unidg_inflight") == 0, timeout=3.0)
        assert 'unidg_errors_total{kind="client_gone"} 1' in get(url, "/metrics").body.decode()
        assert get(url, "/nothing-here").json()["error"] == "not_found"


@pytest.mark.parametrize("media_type", ["multipart/form-data", "MULTIPART/FORM-DATA", "Multipart/Form-Data"])
def test_the_multipart_media_type_is_matched_without_regard_to_case(media_type):
    import asyncio

    from starlette.datastructures import Headers

    from unidg.runtime.serve.app import parse_multipart

    files = sample_inputs(32)
    body, content_type = encode_multipart(files, {"params": "{}"})
    boundary = content_type.split(";", 1)[1]  # the boundary itself is case-sensitive and kept as sent
    fields = asyncio.run(parse_multipart(Headers({"content-type": f"{media_type};{boundary}"}), body))
    assert fields["source"] == files["source"] and fields["params"] == "{}"
    for other in ("multipart/form-datax;" + boundary, "text/plain"):
        with pytest.raises(ServiceError) as refused:
            asyncio.run(parse_multipart(Headers({"content-type": other}), body))
        assert refused.value.status == 415


# ------------------------------------------------------------------------------------- UniDG-Text: the prompt field
def _sample_files(*kinds: str) -> dict[str, bytes]:
    field_of = {"reference": "reference", "reference_mask": "reference_mask", "source": "source", "mask": "mask"}
    return {field_of[kind]: sample_path(kind).read_bytes() for kind in kinds}


def _prompt_form(prompt: str | bytes | None, *kinds: str, params: dict | None = None) -> tuple[bytes, str]:
    """A form with the sample's ``kinds`` files and a prompt (bytes: sent as a file part, as a client may)."""
    files = _sample_files(*kinds)
    fields = {"params": json.dumps(params or {"seed": 2, "steps": 3})}
    if isinstance(prompt, bytes):
        files["prompt"] = prompt
    elif prompt is not None:
        fields["prompt"] = prompt
    return encode_multipart(files, fields)


def test_the_prompt_field_with_and_without_a_reference_on_a_text_bundle():
    bundle = text_bundle()
    config = ServeConfig(bundle=str(bundle), workers=1, backend_options={"threads": 1})
    with serve_in_thread(create_app(config)) as url:
        wait_ready(url, timeout=60)
        replies = {}
        for name, prompt, kinds in [
            ("hole", PROMPT, ("source", "mask")),
            ("crack", OTHER_PROMPT, ("source", "mask")),
            ("with reference", None, ("reference", "reference_mask", "source", "mask")),
            ("both", PROMPT, ("reference", "reference_mask", "source", "mask")),
        ]:
            reply = post(url, *_prompt_form(prompt, *kinds))
            assert reply.status == 200, (name, reply.body[:300])
            replies[name] = reply.json()
        assert replies["hole"]["metadata"]["prompt"] == PROMPT
        assert replies["hole"]["metadata"]["with_reference"] is False
        assert replies["both"]["metadata"]["with_reference"] is True
        assert replies["with reference"]["metadata"]["prompt"]  # the bundle's reference instruction
        hole, crack = _decode_png(replies["hole"]["image_png"]), _decode_png(replies["crack"]["image_png"])
        mask = _decode_png(replies["hole"]["mask_png"]) > 127
        source = np.asarray(Image.open(sample_path("source")).convert("RGB"))
        assert masked_equal_outside(hole, source, mask) and masked_equal_outside(crack, source, mask)
        assert not np.array_equal(hole[mask], crack[mask])  # the instruction changes the defect, only inside

        refused = [
            ("empty prompt", _prompt_form("", "source", "mask"), "prompt", "empty"),
            ("over-long prompt", _prompt_form(LONG_PROMPT, "source", "mask"), "prompt", "at most 48"),
            ("prompt not UTF-8", _prompt_form(b"Add the \xff defect.", "source", "mask"), "prompt", "UTF-8"),
            ("reference without mask", _prompt_form(PROMPT, "reference", "source", "mask"), "reference_mask", ""),
            ("mask without reference", _prompt_form(PROMPT, "reference_mask", "source", "mask"), "reference", ""),
            ("no prompt, no reference", _prompt_form(None, "source", "mask"), "reference", "prompt"),
            ("prompt in params", _prompt_form(None, "source", "mask", params={"prompt": PROMPT}), "params.prompt", ""),
        ]
        for name, (body, content_type), field, words in refused:
            reply = post(url, body, content_type)
            assert reply.status == 422, (name, reply.status, reply.body[:300])
            assert reply.json()["field"] == field and words in reply.json()["message"], (name, reply.json())
        assert post(url, *_prompt_form(PROMPT, "source", "mask")).status == 200  # still serving


def test_a_prompt_for_a_reference_mode_bundle_is_refused_naming_the_field(bundle):
    config = ServeConfig(bundle=str(bundle), workers=1)
    files = sample_inputs(64)
    with serve_in_thread(create_app(config)) as url:
        wait_ready(url, timeout=60)
        for form in (files, {"source": files["source"], "mask": files["mask"]}):
            reply = post(url, *encode_multipart(form, {"prompt": PROMPT}))
            assert reply.status == 422 and reply.json()["field"] == "prompt", reply.body[:300]
            assert "reference-mode bundle" in reply.json()["message"]
            assert str(bundle.parent) not in reply.body.decode()  # the runtime's message names the folder: redacted
        assert post(url, *encode_multipart(files)).status == 200  # no prompt: as ever
