"""HTTP service limits: admission before the body, bounded decodes, PNG/JPEG only, slow and idle connections,
client-caused errors answered 4xx, and nothing of the server's file system or secrets in answers.

Servers run as uvicorn in a thread on 127.0.0.1 with the service's own settings (unidg.runtime.serve.server), around
the real synthesizer of the toy bundle. Load figures (peak RSS with oversized uploads, 503 latency, idle connections,
p50/p95) are measured by `unidg bench serve --scenario ...` (docs/service.md), not here.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from surface_fixtures import toy_bundle
from test_serve import SlowedSynthesizer, _metric, _wait_for, serve_in_thread

from unidg.core import images
from unidg.runtime.serve import ServeConfig, ServiceError, create_app, parse_params
from unidg.runtime.serve import protocol as serve_protocol
from unidg.runtime.serve_client import (
    encode_multipart,
    get,
    post,
    sample_inputs,
    start_server,
    stop_server,
    wait_ready,
)
from unidg.runtime.synthesizer import DefectSynthesizer


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return toy_bundle(tmp_path_factory.mktemp("serve-limits") / "bundle")


@pytest.fixture(scope="module")
def service(bundle):
    """A keyless loopback service with short read timeouts and few connections, so the limits show quickly."""
    with serving(
        bundle, max_queue=2, header_timeout_s=0.5, body_timeout_s=0.5, max_connections=16, timeout_s=30.0
    ) as served:
        yield served


@contextlib.contextmanager
def serving(bundle, **limits) -> Iterator[tuple[str, ServeConfig]]:
    """A keyless loopback service of one worker on ``bundle`` with ``limits``, ready: (URL, its config)."""
    config = ServeConfig(bundle=str(bundle), workers=1, **limits)
    with serve_in_thread(create_app(config)) as url:
        wait_ready(url, timeout=60)
        yield url, config


def _address(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url)
    return parsed.hostname, parsed.port


def _raw(url: str, data: bytes, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(_address(url), timeout=timeout)
    sock.sendall(data)
    return sock


def _read_reply(sock: socket.socket) -> tuple[int, dict]:
    """(status, JSON body) of one HTTP reply read off a raw socket (the server closes or sends Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without a reply: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), None
    )
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ")[1]), json.loads(body)


def _closed_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------- admission and bounded decodes
def test_a_full_service_answers_503_before_reading_the_body(bundle):
    gate = threading.Event()
    config = ServeConfig(bundle=str(bundle), workers=1, max_queue=0, timeout_s=30.0)
    app = create_app(config, factory=lambda: SlowedSynthesizer(DefectSynthesizer.from_bundle(bundle), 0.0, gate))
    body, content_type = encode_multipart(sample_inputs(64))
    gate.set()  # let the warm-up through, then hold the next synthesis
    with serve_in_thread(app) as url:
        wait_ready(url, timeout=60)
        gate.clear()
        holder = threading.Thread(target=post, args=(url, body, content_type), daemon=True)
        holder.start()
        _wait_for(lambda: _metric(url, "unidg_inflight") == 1)
        # Announce a 10 MB body and send none of it: the answer must not wait for it.
        host, port = _address(url)
        head = f"POST /v1/synthesize HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        sock = _raw(url, f"{head}Content-Length: 10000000\r\n\r\n".encode())
        status, reply = _read_reply(sock)
        sock.close()
        assert status == 503 and reply["error"] == "queue_full", reply
        gate.set()
        holder.join(30)


def test_concurrent_decodes_are_bounded_by_the_workers(bundle, monkeypatch):
    active, seen, lock = [0], [0], threading.Lock()
    real = serve_protocol.decode_upload

    def counting(*args, **kwargs):
        with lock:
            active[0] += 1
            seen[0] = max(seen[0], active[0])
        try:
            time.sleep(0.02)
            return real(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(serve_protocol, "decode_upload", counting)
    body, content_type = encode_multipart(sample_inputs(64), {"params": json.dumps({"steps": 1})})
    with serving(bundle, max_queue=8, timeout_s=60.0) as (url, config):
        replies = []
        threads = [
            threading.Thread(target=lambda: replies.append(post(url, body, content_type)), daemon=True)
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert [r.status for r in replies] == [200] * 6
    # One request checked before the queue plus one decoded by the worker; unbounded, six would decode at once.
    assert 1 <= seen[0] <= 2 * config.workers, seen[0]


def test_declared_size_is_refused_from_the_header_before_decoding():
    big = _png(np.zeros((3000, 3000), dtype=np.uint8))
    header_only = big[:200]  # IHDR and no pixel data: decoding would fail, the size check does not need it
    with pytest.raises(images.ImageTooLarge, match="3000x3000 = 9000000 pixels"):
        images.decode_upload(header_only, "source image", max_pixels=1000 * 1000, as_mask=False)
    jpeg = _png(np.zeros((40, 30, 3), dtype=np.uint8), "JPEG")
    with pytest.raises(images.ImageTooLarge):
        images.open_upload(jpeg, "source image", max_pixels=1000)  # JPEG SOF read at open
    assert images.decode_upload(jpeg, "source image", max_pixels=10_000, as_mask=False).shape == (40, 30, 3)


# ------------------------------------------------------------------------------------------------ PNG and JPEG only
@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF", "WEBP", "PPM"])
def test_uploads_other_than_png_and_jpeg_are_refused(fmt):
    data = _png(np.full((16, 16, 3), 90, dtype=np.uint8), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would read it
    with pytest.raises(images.InputError, match="only PNG and JPEG are accepted"):
        images.decode_upload(data, "reference image", max_pixels=10_000, as_mask=False)


def test_an_eps_upload_never_reaches_ghostscript(service):
    url, _ = service
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n%%EOF\n"
    body, content_type = encode_multipart({**sample_inputs(64), "reference": eps})
    reply = post(url, body, content_type)
    assert reply.status == 422 and reply.json()["field"] == "reference", reply.body
    assert "only PNG and JPEG" in reply.json()["message"]


# ---------------------------------------------------------------------------------------- slow and idle connections
def test_idle_connections_are_closed_and_the_service_keeps_answering(service):
    url, config = service
    host, port = _address(url)
    idle = []
    for index in range(3 * config.max_connections):
        sock = socket.create_connection((host, port), timeout=5.0)
        if index % 2:
            sock.sendall(f"POST /v1/synthesize HTTP/1.1\r\nHost: {host}:{port}\r\n".encode())  # half a head
        idle.append(sock)
    try:
        # Beyond max_connections the longest-idle ones make room at once; real requests still get through.
        assert get(url, "/healthz").status == 200
        body, content_type = encode_multipart(sample_inputs(64), {"params": json.dumps({"steps": 1})})
        assert post(url, body, content_type).status == 200
        time.sleep(0.2)
        assert sum(_closed_by_server(sock) for sock in idle) >= len(idle) - config.max_connections
        # The rest are closed by the head timeout.
        time.sleep(config.header_timeout_s + 0.5)
        assert all(_closed_by_server(sock) for sock in idle)
    finally:
        for sock in idle:
            sock.close()
    assert get(url, "/healthz").status == 200


def test_idle_connections_beyond_the_file_limit_do_not_take_the_command_down(bundle, tmp_path):
    # `unidg serve` under `ulimit -n 256`: 300 idle connections would exhaust the descriptors (accept() failing in a
    # loop, real clients never accepted) unless the service keeps fewer connections than its limit allows.
    log = tmp_path / "server.log"
    process, url = start_server(bundle, extra_args=["--no-warmup", "--threads", "1"], log_path=log, nofile=256)
    idle = []
    try:
        wait_ready(url, process, timeout=120)
        host, port = _address(url)
        idle = [socket.create_connection((host, port), timeout=5.0) for _ in range(300)]
        assert get(url, "/healthz", timeout=10.0).status == 200
        body, content_type = encode_multipart(sample_inputs(64), {"params": json.dumps({"steps": 1})})
        assert post(url, body, content_type, timeout=60.0).status == 200
        assert process.poll() is None
    finally:
        for sock in idle:
            sock.close()
        stop_server(process)
    assert log.stat().st_size < 20_000, log.read_text()[-2000:]


def test_a_body_that_does_not_arrive_is_answered_408(service):
    url, _ = service
    host, port = _address(url)
    content_type = encode_multipart(sample_inputs(64))[1]
    head = f"POST /v1/synthesize HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
    sock = _raw(url, f"{head}Content-Length: 5000\r\n\r\n".encode() + b"x" * 100)
    status, reply = _read_reply(sock)
    sock.close()
    assert status == 408 and reply["error"] == "request_timeout", reply


# --------------------------------------------------------------------------------------- client-caused errors → 4xx
def test_params_with_huge_integers_or_deep_nesting_are_400():
    for text in ('{"seed": ' + "9" * 5000 + "}", "[" * 20_000 + "]" * 20_000, '{"seed": ' + "[" * 20_000 + "]"):
        with pytest.raises(ServiceError) as caught:
            parse_params(text, max_steps=50)
        assert caught.value.status == 400 and caught.value.field == "params"
    with pytest.raises(ServiceError) as caught:
        parse_params('{"seed": ' + "9" * 4000 + "}", max_steps=50)  # under the digit limit: a range error
    assert caught.value.status == 422 and "4000 digits" in caught.value.message


def test_huge_params_over_http_are_4xx(service):
    url, _ = service
    for text in ('{"seed": ' + "9" * 5000 + "}", "[" * 20_000 + "]" * 20_000):
        body, content_type = encode_multipart(sample_inputs(64), {"params": text})
        reply = post(url, body, content_type)
        assert reply.status == 400 and reply.json()["field"] == "params", reply.body[:300]


def test_a_client_that_disconnects_during_the_upload_is_client_gone(service):
    url, _ = service
    host, port = _address(url)
    counted = 'unidg_errors_total{kind="client_gone"}'
    before = 0.0 if math.isnan(_metric(url, counted)) else _metric(url, counted)
    content_type = encode_multipart(sample_inputs(64))[1]
    head = f"POST /v1/synthesize HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
    sock = _raw(url, f"{head}Content-Length: 100000\r\n\r\n".encode() + b"x" * 1000)
    time.sleep(0.1)
    sock.close()
    _wait_for(lambda: _metric(url, counted) == before + 1)
    assert 'kind="internal"' not in get(url, "/metrics").body.decode()


# ------------------------------------------------------------------------------ paths, Host, request ids, secrets
def test_answers_carry_no_server_paths(service, bundle):
    url, _ = service
    ready = get(url, "/readyz")
    assert ready.status == 200 and str(bundle) not in ready.body.decode() and ready.json()["bundle_fingerprint"]
    body, content_type = encode_multipart(sample_inputs(64), {"params": json.dumps({"steps": 1, "seed": 2})})
    reply = post(url, body, content_type)
    assert reply.status == 200, reply.body[:300]
    assert "path" not in reply.json()["metadata"]["bundle"] and reply.json()["metadata"]["bundle"]["fingerprint"]
    assert str(bundle.parent) not in reply.body.decode()


def test_a_keyless_service_answers_only_loopback_host_names(service):
    url, _ = service
    host, port = _address(url)
    for name in ("evil.example", "evil.example:80", "192.168.1.10", ""):
        reply = get(url, "/readyz", headers={"Host": name})
        assert reply.status == 400 and reply.json()["error"] == "invalid_host", (name, reply.body)
    for name in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "[::1]:8080"):
        assert get(url, "/healthz", headers={"Host": name}).status == 200, name
    keyed = ServeConfig(bundle="b", api_key="k")
    assert not keyed.checks_host_header  # with a key, proxies may use any name


def test_request_ids_are_bounded(service):
    url, _ = service
    body, content_type = encode_multipart(sample_inputs(64), {"params": json.dumps({"steps": 1})})
    for bad in ("x" * 129, "two words", "tab\there"):
        reply = post(url, body, content_type, headers={"X-Request-ID": bad})
        assert reply.status == 400 and reply.json()["field"] == "X-Request-ID", reply.body[:200]
        assert bad not in reply.body.decode()
    good = post(url, body, content_type, headers={"X-Request-ID": "line-4/job:17"})
    assert good.status == 200 and good.headers["x-request-id"] == "line-4/job:17"


def test_the_config_repr_hides_the_api_key():
    config = ServeConfig(bundle="b", host="0.0.0.0", api_key="station-secret-31")
    assert "station-secret-31" not in repr(config) and "station-secret-31" not in str(config)


def test_a_non_integer_content_length_gets_the_json_error_shape(service):
    url, _ = service
    host, port = _address(url)
    for length in ("abc", "1e3", "-5"):
        sock = _raw(
            url, f"POST /v1/synthesize HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {length}\r\n\r\n".encode()
        )
        status, reply = _read_reply(sock)
        sock.close()
        assert status == 400 and reply["error"] == "bad_request" and reply["message"], (length, reply)


def test_only_the_app_and_server_modules_import_the_web_stack():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import unidg.runtime.serve, unidg.runtime.serve.config, unidg.runtime.serve.protocol\n"
        "import unidg.runtime.serve.pool, unidg.runtime.serve.metrics\n"
        "print(sorted(m for m in ('fastapi', 'starlette', 'uvicorn') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"the lean part of the service loaded {out}"


# ------------------------------------------------------------------------------- slow bodies, heads, decoded memory
def _slow_body_sockets(url: str, count: int, content_type: str) -> list[socket.socket]:
    """Connections that send a full head announcing 100 kB, then 100 bytes of body, and nothing more."""
    host, port = _address(url)
    head = f"POST /v1/synthesize HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
    return [_raw(url, f"{head}Content-Length: 100000\r\n\r\n".encode() + b"x" * 100) for _ in range(count)]


def test_slow_bodies_hold_no_admission_place(bundle):
    # More slow uploads than the service has places (1 worker + queue 1): valid requests must still be served.
    body, content_type = encode_multipart(sample_inputs(64), {"params": json.dumps({"steps": 1})})
    with serving(bundle, max_queue=1, body_timeout_s=8.0, timeout_s=30.0) as (url, _):
        slow = _slow_body_sockets(url, 5, content_type)
        try:
            time.sleep(0.3)  # their heads are in and their bodies are being read
            statuses = [post(url, body, content_type, timeout=30.0).status for _ in range(3)]
            assert statuses == [200, 200, 200], statuses
            assert not any(_closed_by_server(sock) for sock in slow)  # still being read, not dropped to make room
        finally:
            for sock in slow:
                sock.close()


def test_a_body_slower_than_the_minimum_rate_is_answered_408_early(bundle):
    limits = {"max_queue": 1, "header_timeout_s": 1.0, "body_timeout_s": 30.0, "min_body_rate_kib_s": 1.0}
    with serving(bundle, timeout_s=30.0, **limits) as (url, _):
        started = time.monotonic()
        (sock,) = _slow_body_sockets(url, 1, encode_multipart(sample_inputs(64))[1])
        status, reply = _read_reply(sock)
        sock.close()
    assert status == 408 and "KiB/s" in reply["message"], reply
    assert time.monotonic() - started < 5.0  # 100 kB at >= 1 KiB/s after 1 s of grace, not the 30 s body limit


def test_a_request_head_over_the_limit_is_400(service):
    url, config = service
    host, port = _address(url)
    filler = "".join(f"X-Filler-{index}: {'a' * 100}\r\n" for index in range(400))  # ~45 KB in one send
    assert len(filler) > config.max_header_bytes
    sock = _raw(url, f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n{filler}\r\n".encode())
    status, reply = _read_reply(sock)
    sock.close()
    assert status == 400 and reply["error"] == "bad_request" and "head" in reply["message"], reply
    assert get(url, "/healthz").status == 200


def test_a_request_refused_after_decoding_frees_its_pictures_at_once(bundle):
    # The pictures of a refused request must not wait for the garbage collector (reference cycles through the
    # exception's traceback kept ~145 MiB per 4 x 16.7 MP request alive: 2.8 GiB after a burst).
    import gc
    import tracemalloc

    side = 768
    image = np.full((side, side, 3), 200, dtype=np.uint8)
    full = np.full((side, side), 255, dtype=np.uint8)  # a full target mask: decoded, then refused
    files = {"reference": _png(image), "reference_mask": _png(full), "source": _png(image), "mask": _png(full)}
    body, content_type = encode_multipart(files)
    with serving(bundle, max_queue=2, timeout_s=30.0) as (url, _):
        assert post(url, body, content_type).status == 422  # first-time imports and caches outside the measure
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            statuses = [post(url, body, content_type).status for _ in range(3)]
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
            gc.enable()
    assert statuses == [422] * 3
    decoded = side * side * 8  # two RGB pictures and two masks
    assert held < decoded, f"{held / 2**20:.1f} MiB still held after 3 refused requests"
