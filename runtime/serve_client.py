"""The loopback HTTP client of ``unidg bench serve`` and the service tests: a free port, the ``unidg serve`` child
process, multipart requests and their replies, the test pictures, and the server's resident memory (Linux /proc).

Only the standard library on the client side (http.client, sockets), so measuring the service needs nothing beyond
the runtime."""

from __future__ import annotations

import functools
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_mib(pid: int) -> float | None:
    """Resident set size of a process in MiB (Linux), None where /proc is not available."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def oversized_inputs(side: int = 4096) -> dict[str, bytes]:
    """A request whose four PNGs each declare ``side``² pixels but compress to little (flat areas): the upload is
    small, the decoded pictures are not (4096: 2 × 48 MiB RGB + 2 × 16 MiB masks)."""
    image = np.full((side, side, 3), 200, dtype=np.uint8)
    image[side // 4 : side // 2, side // 4 : side // 2] = (60, 40, 30)
    mask = np.zeros((side, side), dtype=np.uint8)
    mask[side // 4 : side // 2, side // 4 : side // 2] = 255
    image_png, mask_png = png_bytes(image, 9), png_bytes(mask, 9)
    return {"reference": image_png, "reference_mask": mask_png, "source": image_png, "mask": mask_png}


def refused_inputs(side: int = 4096) -> dict[str, bytes]:
    """Four ``side``² pictures that are decoded and then refused: the target mask covers the whole source."""
    image = np.full((side, side, 3), 200, dtype=np.uint8)
    full = np.full((side, side), 255, dtype=np.uint8)
    image_png, mask_png = png_bytes(image, 9), png_bytes(full, 9)
    return {"reference": image_png, "reference_mask": mask_png, "source": image_png, "mask": mask_png}


def sample_inputs(size: int = 96, seed: int = 0) -> dict[str, bytes]:
    """A procedural request (PNG bytes per multipart field): a textured reference with a dark blob as its defect,
    a smooth source and a target square. Sizes differ from S on purpose so the service resizes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = 150 + 40 * np.sin(xx / 5.0)[..., None] + rng.integers(-12, 12, (size, size, 3))
    reference = np.clip(base, 0, 255).astype(np.uint8)
    blob = (yy - size * 0.45) ** 2 / (size * 0.12) ** 2 + (xx - size * 0.55) ** 2 / (size * 0.2) ** 2 <= 1.0
    reference[blob] = (50, 35, 30)
    source = np.clip(190 + 20 * np.cos(yy / 9.0)[..., None] + rng.integers(-6, 6, (size, size, 3)), 0, 255)
    source = source.astype(np.uint8)
    target = np.zeros((size, size), dtype=bool)
    target[size // 3 : size // 3 + size // 4, size // 4 : size // 4 + size // 3] = True
    return {
        "reference": png_bytes(reference),
        "reference_mask": png_bytes(np.where(blob, 255, 0).astype(np.uint8)),
        "source": png_bytes(source),
        "mask": png_bytes(np.where(target, 255, 0).astype(np.uint8)),
    }


def encode_multipart(files: dict[str, bytes], fields: dict[str, str] | None = None) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request."""
    boundary = uuid.uuid4().hex
    parts: list[bytes] = []
    for name, value in (fields or {}).items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value.encode() + b"\r\n"
        )
    for name, data in files.items():
        header = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        )
        parts.append(header.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]  # names in lower case
    seconds: float

    def json(self) -> dict:
        return json.loads(self.body)


def _headers(response: http.client.HTTPResponse) -> dict[str, str]:
    return {name.lower(): value for name, value in response.getheaders()}


def post(
    url: str,
    body: bytes,
    content_type: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 300.0,
    path: str = "/v1/synthesize",
) -> Reply:
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    started = time.perf_counter()
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type, **(headers or {})})
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, data, _headers(response), time.perf_counter() - started)
    finally:
        connection.close()


def get(url: str, path: str, timeout: float = 10.0, headers: dict[str, str] | None = None) -> Reply:
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)
    started = time.perf_counter()
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return Reply(response.status, data, _headers(response), time.perf_counter() - started)
    finally:
        connection.close()


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 120.0) -> float:
    """Poll GET /readyz until 200; returns the seconds waited. Raises if the server exits or never gets ready."""
    started = time.monotonic()
    last = "no answer"
    while time.monotonic() - started < timeout:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready ({last})")
        try:
            reply = get(url, "/readyz", timeout=2.0)
            if reply.status == 200:
                return time.monotonic() - started
            last = f"/readyz {reply.status}: {reply.body[:300]!r}"
            if reply.status == 503 and b'"error"' in reply.body:
                raise RuntimeError(f"the server cannot load its bundle: {reply.body.decode(errors='replace')}")
        except OSError as error:
            last = str(error)
        time.sleep(0.1)
    raise TimeoutError(f"the server was not ready within {timeout:.0f} s ({last})")


def start_server(
    bundle: str | Path,
    *,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
    nofile: int | None = None,
) -> tuple[subprocess.Popen, str]:
    """``unidg serve`` in a child process on a loopback port; returns (process, base url). Caller terminates it.
    ``nofile`` sets the child's file-descriptor limit (soft and hard), as a small ``ulimit -n`` would."""
    port = port or free_loopback_port()
    command = [sys.executable, "-m", "unidg.cli", "serve", "--bundle", str(bundle), "--port", str(port)]
    command += ["--host", "127.0.0.1", "--log-level", "warning", *extra_args]
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    limit = None if nofile is None else functools.partial(_limit_file_descriptors, nofile)
    process = subprocess.Popen(
        command, stdout=output, stderr=output, env={**os.environ, **(env or {})}, preexec_fn=limit
    )
    return process, f"http://127.0.0.1:{port}"


def _limit_file_descriptors(count: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def stop_server(process: subprocess.Popen, timeout: float = 15.0) -> int:
    process.terminate()
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(timeout)
