"""Load test of the HTTP service: ``unidg bench serve`` (and the service tests) send synthesize requests on loopback.

Only the standard library on the client side (http.client, sockets, threads), so the measurement needs nothing beyond
the runtime. With ``--bundle`` the server is started as a child process on a free loopback port and its resident memory
(VmRSS, Linux /proc) is sampled during the run; with ``--url`` an already running service is measured.

Scenarios (``--scenario``):

- ``valid``: ``--requests`` valid requests at ``--concurrency``: latency p50/p95, throughput, RSS before/after/peak.
- ``oversized``: ``--concurrency`` simultaneous small uploads that each declare four ``--declared-size``² images
  (a few hundred KiB compressed): peak RSS, statuses and how fast the refused ones are answered.
- ``overload``: ``--concurrency`` clients keep the service full while a probe sends ``--requests`` valid requests one
  after another: latency of the probe's 503s.
- ``idle``: ``--idle-connections`` sockets that connect and send nothing (or half a request head) for ``--hold``
  seconds while valid requests are sent: whether the service keeps answering, and how many idle sockets it closed.
- ``refused``: ``--concurrency`` simultaneous requests of four ``--declared-size``² pictures with a full target mask,
  each decoded and then refused (422): peak RSS against the bound of docs/service.md for the server's settings.
- ``slow-body``: ``--slow-bodies`` connections send a full head, then 100 bytes every ``--slow-interval`` s, while
  ``--requests`` valid requests are sent one after another: how many were served.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from unidg.core.errors import OptionError
from unidg.runtime.serve.config import ServeConfig
from unidg.runtime.serve_client import (
    Reply,
    encode_multipart,
    oversized_inputs,
    post,
    refused_inputs,
    rss_mib,
    sample_inputs,
    start_server,
    stop_server,
    wait_ready,
)

SCENARIOS = ("valid", "oversized", "overload", "idle", "refused", "slow-body")


@dataclass
class BenchOptions:
    bundle: str | None = None
    url: str | None = None
    requests: int = 200
    concurrency: int = 8
    workers: int = 2
    max_queue: int = 16
    steps: int = 4
    size: int = 96
    threads: int = 1
    warmup_requests: int = 4
    scenario: str = "valid"
    declared_size: int = 4096  # oversized: side of each declared image
    idle_connections: int = 300  # idle: sockets held open
    hold_s: float = 10.0  # idle: how long they are held
    slow_bodies: int = 9  # slow-body: connections trickling their bodies
    slow_interval_s: float = 10.0  # slow-body: seconds between their 100-byte pieces
    server_pythonpath: str | None = None  # PYTHONPATH of the started server only (to measure another checkout)
    server_nofile: int | None = None  # file-descriptor limit of the started server (`ulimit -n`)


@dataclass
class BenchReport:
    requests: int
    concurrency: int
    steps: int
    size: int
    workers: int | None
    statuses: dict[str, int]
    failed: int
    wall_s: float
    throughput_rps: float
    latency_p50_s: float
    latency_p95_s: float
    latency_max_s: float
    rss_before_mib: float | None = None
    rss_after_mib: float | None = None
    errors: list[str] = field(default_factory=list)
    scenario: str = "valid"
    rss_peak_mib: float | None = None  # sampled every 10 ms during the run
    request_bytes: int | None = None
    refused_p50_ms: float | None = None  # 503 answers: client-side seconds from sending to the full reply
    refused_p95_ms: float | None = None
    refused_max_ms: float | None = None
    idle_connections: int | None = None
    idle_closed_by_server: int | None = None  # of the idle sockets, those the server had closed at the end
    server_alive: bool | None = None
    server_log_bytes: int | None = None
    memory_bound_mib: float | None = None  # refused: RSS before + the bound of docs/service.md for these settings
    slow_bodies: int | None = None
    slow_bodies_answered: dict | None = None  # slow-body: status -> count of the slow connections' answers

    def to_dict(self) -> dict:
        return asdict(self)

    def extra_summary(self) -> str:
        parts = []
        if self.request_bytes is not None:
            parts.append(f"request body {self.request_bytes / 1024:.0f} KiB")
        if self.rss_peak_mib is not None:
            parts.append(f"server peak RSS {self.rss_peak_mib:.0f} MiB")
        if self.refused_p50_ms is not None:
            parts.append(
                f"503 latency p50 {self.refused_p50_ms:.1f} ms, p95 {self.refused_p95_ms:.1f} ms, "
                f"max {self.refused_max_ms:.1f} ms"
            )
        if self.idle_connections is not None:
            parts.append(f"{self.idle_closed_by_server}/{self.idle_connections} idle sockets closed by the server")
        if self.memory_bound_mib is not None and self.rss_peak_mib is not None:
            within = "within" if self.rss_peak_mib <= self.memory_bound_mib else "ABOVE"
            parts.append(f"bound {self.memory_bound_mib:.0f} MiB (RSS before + formula): peak {within} it")
        if self.slow_bodies is not None:
            served = self.statuses.get("200", 0)
            parts.append(
                f"{served}/{self.requests} valid requests served while {self.slow_bodies} slow bodies were sent; "
                f"their answers {self.slow_bodies_answered}"
            )
        if self.server_alive is not None:
            parts.append("server alive" if self.server_alive else "server DEAD")
        if self.server_log_bytes is not None:
            parts.append(f"server log {self.server_log_bytes} bytes")
        return "; ".join(parts)

    def summary(self) -> str:
        rss = ""
        if self.rss_before_mib is not None and self.rss_after_mib is not None:
            rss = (
                f"; server RSS {self.rss_before_mib:.1f} MiB before -> {self.rss_after_mib:.1f} MiB after "
                f"({self.rss_after_mib - self.rss_before_mib:+.1f} MiB)"
            )
        return (
            f"{self.requests} requests at concurrency {self.concurrency} ({self.size}x{self.size} px, {self.steps} "
            f"steps, {self.workers or '?'} workers): statuses {self.statuses}; p50 {self.latency_p50_s * 1000:.1f} ms, "
            f"p95 {self.latency_p95_s * 1000:.1f} ms, max {self.latency_max_s * 1000:.1f} ms; "
            f"{self.throughput_rps:.2f} req/s over {self.wall_s:.1f} s{rss}"
            + (f"\n[{self.scenario}] {self.extra_summary()}" if self.extra_summary() else "")
        )


def fire(
    url: str,
    count: int,
    concurrency: int,
    files: dict[str, bytes],
    params: dict | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> tuple[list[Reply], float]:
    """``count`` identical POST /v1/synthesize from ``concurrency`` threads: (replies in order, wall seconds)."""
    body, content_type = encode_multipart(files, {"params": json.dumps(params)} if params else None)
    replies: list[Reply | None] = [None] * count
    next_index = 0
    lock = threading.Lock()

    def worker() -> None:
        nonlocal next_index
        while True:
            with lock:
                index = next_index
                next_index += 1
            if index >= count:
                return
            try:
                replies[index] = post(url, body, content_type, headers=headers, timeout=timeout)
            except OSError as error:
                replies[index] = Reply(0, str(error).encode(), {}, 0.0)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in replies if r is not None], time.perf_counter() - started


def summarize(replies: list[Reply], wall_s: float, options: BenchOptions) -> BenchReport:
    latencies = np.array([r.seconds for r in replies if r.status == 200] or [0.0])
    statuses: dict[str, int] = {}
    for reply in replies:
        statuses[str(reply.status)] = statuses.get(str(reply.status), 0) + 1
    failed = sum(1 for r in replies if r.status != 200)
    errors = [f"{r.status}: {r.body[:200].decode(errors='replace')}" for r in replies if r.status != 200][:5]
    return BenchReport(
        requests=len(replies),
        concurrency=options.concurrency,
        steps=options.steps,
        size=options.size,
        workers=options.workers if options.bundle else None,
        statuses=statuses,
        failed=failed,
        wall_s=wall_s,
        throughput_rps=len(replies) / wall_s if wall_s > 0 else 0.0,
        latency_p50_s=float(np.percentile(latencies, 50)),
        latency_p95_s=float(np.percentile(latencies, 95)),
        latency_max_s=float(latencies.max()),
        errors=errors,
    )


class RssSampler:
    """Samples a process's VmRSS every ``interval`` seconds in a thread; ``peak`` is the largest value seen."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = rss_mib(self.pid)
            if value is not None and (self.peak is None or value > self.peak):
                self.peak = value
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def open_idle_connections(url: str, count: int) -> list[socket.socket]:
    """``count`` sockets to the service: every other one sends half a request head and stops, the rest send nothing."""
    parsed = urllib.parse.urlsplit(url)
    sockets = []
    for index in range(count):
        sock = socket.create_connection((parsed.hostname, parsed.port), timeout=5.0)
        if index % 2:
            sock.sendall(f"POST /v1/synthesize HTTP/1.1\r\nHost: {parsed.hostname}:{parsed.port}\r\n".encode())
        sockets.append(sock)
    return sockets


def closed_by_peer(sock: socket.socket) -> bool:
    """True when the other end has closed (or reset) the connection; reads nothing of a live idle one."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def probe_a_full_service(
    url: str, options: BenchOptions, files: dict[str, bytes], params: dict
) -> tuple[list[Reply], float]:
    """``--concurrency`` client threads keep the service full (each sends its next request as soon as it has an answer)
    while one probe sends ``--requests`` requests one after another, 20 ms apart: the probe's replies (mostly 503)."""
    stop = threading.Event()
    body, content_type = encode_multipart(files, {"params": json.dumps(params)})

    def keep_full() -> None:
        while not stop.is_set():
            try:
                reply = post(url, body, content_type, timeout=300.0)
            except OSError:
                reply = None
            if reply is None or reply.status == 503:
                stop.wait(0.005)

    load = [threading.Thread(target=keep_full, daemon=True) for _ in range(options.concurrency)]
    for thread in load:
        thread.start()
    time.sleep(1.0)  # the queue fills
    probes: list[Reply] = []
    started = time.perf_counter()
    try:
        for _ in range(options.requests):
            try:
                probes.append(post(url, body, content_type, timeout=300.0))
            except OSError as error:
                probes.append(Reply(0, str(error).encode(), {}, 0.0))
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in load:
            thread.join(300.0)
    return probes, time.perf_counter() - started


def trickle_bodies(url: str, options: BenchOptions, content_type: str, stop: threading.Event) -> dict[str, int]:
    """``--slow-bodies`` connections that each send a full head announcing 1 MB, then 100 bytes every
    ``--slow-interval`` s until ``stop`` is set or the server answers; returns their answers' statuses."""
    parsed = urllib.parse.urlsplit(url)
    head = (
        f"POST /v1/synthesize HTTP/1.1\r\nHost: {parsed.hostname}:{parsed.port}\r\nContent-Type: {content_type}\r\n"
        "Content-Length: 1000000\r\n\r\n"
    ).encode()
    address = (parsed.hostname, parsed.port)
    sockets = [socket.create_connection(address, timeout=5.0) for _ in range(options.slow_bodies)]
    answers: dict[str, int] = {}
    open_sockets = list(sockets)
    try:
        for sock in sockets:
            sock.sendall(head + b"x" * 100)
        while open_sockets and not stop.wait(options.slow_interval_s):
            for sock in list(open_sockets):
                try:
                    sock.sendall(b"x" * 100)
                except OSError:
                    open_sockets.remove(sock)  # answered (408) and closed by the server
    finally:
        for sock in sockets:
            status = "open"
            with contextlib.suppress(OSError, ValueError, IndexError):
                sock.settimeout(0.2)
                status = sock.recv(64).split(b" ")[1].decode() or "closed"
            answers[status] = answers.get(status, 0) + 1
            sock.close()
    return answers


def _ms_percentiles(seconds: list[float]) -> tuple[float | None, float | None, float | None]:
    if not seconds:
        return None, None, None
    values = np.array(seconds) * 1000.0
    return float(np.percentile(values, 50)), float(np.percentile(values, 95)), float(values.max())


def run_bench_command(options: BenchOptions) -> BenchReport:
    """Start a server (with --bundle) or use --url, warm it, then run ``options.scenario``."""
    for name in ("requests", "concurrency", "steps", "size"):
        if getattr(options, name) < 1:
            raise OptionError(f"--{name} {getattr(options, name)}: give a value >= 1")
    if options.scenario not in SCENARIOS:
        raise OptionError(f"--scenario {options.scenario!r}: use one of {list(SCENARIOS)}")
    if options.scenario == "idle" and not 1 <= options.idle_connections <= 2000:
        raise OptionError(f"--idle-connections {options.idle_connections}: give a count in [1, 2000]")
    files = sample_inputs(options.size)
    params = {"steps": options.steps, "seed": 0}
    process = None
    url = options.url
    log_path = None
    if options.bundle:
        extra = ["--workers", str(options.workers), "--max-queue", str(options.max_queue)]
        extra += ["--threads", str(options.threads)]
        env = {"PYTHONPATH": options.server_pythonpath} if options.server_pythonpath else None
        log_path = Path(tempfile.mkdtemp(prefix="unidg-bench-serve-")) / "server.log"
        process, url = start_server(
            options.bundle, extra_args=extra, env=env, log_path=log_path, nofile=options.server_nofile
        )
    assert url is not None
    extra_fields: dict = {"scenario": options.scenario}
    try:
        wait_ready(url, process, timeout=300.0)
        # Warm the HTTP path too (first multipart parse, first PNG encode), then measure memory from there.
        fire(url, options.warmup_requests, min(options.concurrency, options.warmup_requests), files, params)
        before = rss_mib(process.pid) if process else None
        sampler = RssSampler(process.pid) if process else contextlib.nullcontext()
        with sampler:
            if options.scenario == "oversized":
                big = oversized_inputs(options.declared_size)
                extra_fields["request_bytes"] = len(encode_multipart(big, {"params": json.dumps(params)})[0])
                replies, wall = fire(url, options.concurrency, options.concurrency, big, params)
            elif options.scenario == "idle":
                idle = open_idle_connections(url, options.idle_connections)
                try:
                    replies, wall = [], 0.0
                    deadline = time.monotonic() + options.hold_s
                    while time.monotonic() < deadline and len(replies) < options.requests:
                        more, seconds = fire(url, 1, 1, files, params, timeout=30.0)
                        replies += more
                        wall += seconds
                        time.sleep(0.1)
                    time.sleep(max(deadline - time.monotonic(), 0.0))
                    extra_fields["idle_connections"] = len(idle)
                    extra_fields["idle_closed_by_server"] = sum(closed_by_peer(sock) for sock in idle)
                finally:
                    for sock in idle:
                        sock.close()
                replies += fire(url, 1, 1, files, params, timeout=30.0)[0]  # and still serving afterwards
            elif options.scenario == "refused":
                big = refused_inputs(options.declared_size)
                extra_fields["request_bytes"] = len(encode_multipart(big, {"params": json.dumps(params)})[0])
                replies, wall = fire(url, options.concurrency, options.concurrency, big, params)
                if before is not None:
                    bound = ServeConfig(bundle="-", workers=options.workers, max_queue=options.max_queue)
                    extra_fields["memory_bound_mib"] = before + bound.memory_bound_bytes() / 2**20
            elif options.scenario == "slow-body":
                stop = threading.Event()
                answers: dict[str, int] = {}
                content_type = encode_multipart(files)[1]
                trickler = threading.Thread(
                    target=lambda: answers.update(trickle_bodies(url, options, content_type, stop)), daemon=True
                )
                trickler.start()
                time.sleep(1.0)  # their heads are in
                replies, wall = fire(url, options.requests, 1, files, params, timeout=120.0)
                stop.set()
                trickler.join(30.0)
                extra_fields["slow_bodies"] = options.slow_bodies
                extra_fields["slow_bodies_answered"] = answers
            elif options.scenario == "overload":
                replies, wall = probe_a_full_service(url, options, files, params)
            else:
                replies, wall = fire(url, options.requests, options.concurrency, files, params)
        after = rss_mib(process.pid) if process else None
        if process is not None:
            extra_fields["server_alive"] = process.poll() is None
    finally:
        if process is not None:
            stop_server(process)
    report = summarize(replies, wall, options)
    report.rss_before_mib, report.rss_after_mib = before, after
    for name, value in extra_fields.items():
        setattr(report, name, value)
    if isinstance(sampler, RssSampler):
        report.rss_peak_mib = sampler.peak
    refused = [r.seconds for r in replies if r.status == 503]
    report.refused_p50_ms, report.refused_p95_ms, report.refused_max_ms = _ms_percentiles(refused)
    if log_path is not None and log_path.exists():
        report.server_log_bytes = log_path.stat().st_size
    return report
