"""What ``unidg serve`` takes (``ServeConfig``) and the address rules: who may reach a service without a key."""

from __future__ import annotations

import ipaddress
import math
import os
from dataclasses import dataclass, field

from unidg.core.errors import OptionError

API_KEY_HEADER = "X-API-Key"
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Peak bytes while one request's four uploads are decoded and checked, per pixel of ``max_image_pixels``: two RGB
# pictures (3 B/px) and two masks (1 B/px) kept, plus Pillow's 4 B/px buffer and its 3 B/px export while one picture
# is read (measured: 180 MiB at 4 x 16.7 MP, 10.7 B/px; rounded up).
DECODE_BYTES_PER_PIXEL = 12


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``unidg serve`` takes. ``workers`` are synthesis threads (each holds one synthesizer).

    Memory (``memory_bound_bytes``): the uploads being received and those of admitted requests share one budget of
    ``(workers + max_queue) × max_upload_mb``, reserved as bytes arrive (a slow upload holds only what it sent); a
    request is admitted (at most ``workers + max_queue``) once its whole body is in; decoded pictures exist only while
    a request is checked or synthesized, for at most ``workers`` requests each.
    """

    bundle: str
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_queue: int = 8  # requests waiting for a worker (running ones not counted)
    timeout_s: float = 120.0  # per request, queue wait included
    max_upload_mb: float = 20.0  # whole request body
    max_image_pixels: int = 4096 * 4096  # per uploaded image, checked from its header before decoding
    max_steps: int = 200
    api_key: str | None = field(default=None, repr=False)  # a secret: never in logs or tracebacks
    backend: str = "onnxruntime"
    backend_options: dict = field(default_factory=dict)
    warmup: bool = True
    verify: bool = True  # re-hash the bundle's files when each worker loads it
    header_timeout_s: float = 10.0  # a connection must send a complete request head within this (and between requests)
    body_timeout_s: float = 60.0  # the whole body must arrive within this once the head is in
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # open connections; beyond it the longest-idle one is closed (or the new one)
    max_header_bytes: int = 16 * 1024  # request line + headers
    # After the head timeout's grace, a body must keep arriving at this mean rate (else 408): a slow sender cannot
    # keep a connection for the whole body timeout.
    min_body_rate_kib_s: float = 16.0

    def __post_init__(self) -> None:
        for name in ("workers", "max_steps", "max_image_pixels", "max_connections", "max_header_bytes"):
            if getattr(self, name) < 1:
                raise OptionError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})")
        if self.max_queue < 0:
            raise OptionError(f"--max-queue must be >= 0 (got {self.max_queue})")
        if not self.timeout_s > 0:
            raise OptionError(f"--timeout must be > 0 seconds (got {self.timeout_s})")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise OptionError(f"{name} must be > 0 seconds (got {getattr(self, name)})")
        if not (math.isfinite(self.min_body_rate_kib_s) and self.min_body_rate_kib_s > 0):
            raise OptionError(f"min_body_rate_kib_s must be a finite number > 0 (got {self.min_body_rate_kib_s})")
        if not self.max_upload_mb > 0:
            raise OptionError(f"--max-upload-mb must be > 0 (got {self.max_upload_mb})")
        if self.api_key is not None and not self.api_key:
            raise OptionError("the API key is empty; set the environment variable to a non-empty secret")
        check_bind_address(self.host, self.api_key)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def upload_budget_bytes(self) -> int:
        """Bytes of request bodies held at once: those being received and those of admitted requests together."""
        return (self.workers + self.max_queue) * self.max_upload_bytes

    def memory_bound_bytes(self, synthesis_bytes: int = 0) -> int:
        """What requests may hold beyond the loaded model (docs/service.md): the upload budget, plus one parsed copy
        of a body, plus ``2 × workers`` requests decoding at the pixel limit (checks before the queue, and workers),
        plus ``workers × synthesis_bytes`` (the synthesis working set of the inputs, not counted by default)."""
        decoding = 2 * self.workers * DECODE_BYTES_PER_PIXEL * self.max_image_pixels
        return self.upload_budget_bytes + self.max_upload_bytes + decoding + self.workers * synthesis_bytes

    @property
    def checks_host_header(self) -> bool:
        """A keyless service (loopback only) answers only requests addressed to a loopback name: a web page on another
        site that rebinds its DNS name to 127.0.0.1 sends its own name as Host and is refused."""
        return self.api_key is None


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
        raise OptionError(
            f"refusing to bind to {host}: only loopback (127.0.0.1, ::1, localhost) is allowed without an API key; "
            "put a secret in an environment variable and pass --api-key-env VAR (clients send it as X-API-Key)"
        )


def host_header_is_loopback(value: str | None) -> bool:
    """True for a Host header naming this machine (``localhost``, ``127.0.0.1``, ``[::1]``, each with any port)."""
    if not value:
        return False
    host = value.strip().lower()
    if host.startswith("["):  # [::1]:8080
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in LOOPBACK_NAMES or (host != "localhost" and is_loopback(host))


def api_key_from_env(variable: str | None) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise OptionError(f"--api-key-env {variable}: the environment variable {variable} is unset or empty")
    return value
