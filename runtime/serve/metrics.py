"""The service's counters in Prometheus text exposition format 0.0.4 (no client library needed)."""

from __future__ import annotations

import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


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

    def mean_synthesis_s(self, default: float = 1.0) -> float:
        with self._lock:
            return self.synthesis.sum / self.synthesis.total if self.synthesis.total else default

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
                "# HELP unidg_queue_depth Admitted requests not running yet (being received, checked, or queued).",
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
