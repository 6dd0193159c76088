"""The HTTP server under the app: uvicorn (h11) with connection limits and read timeouts.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and limits the request head's size (h11), but waits
forever for a connection that never sends a complete request head, and keeps every connection it accepts. The protocol
below adds both: a connection gets ``header_timeout_s`` for each request head, and beyond ``max_connections`` the
longest-idle connection (no request in progress) is closed to make room — or the new one, when every connection is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from unidg.runtime.serve.config import ServeConfig


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[asyncio.Protocol]:
    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _opened_at = 0.0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._opened_at = time.monotonic()
            if len(self.connections) > max_connections:
                idle = [c for c in self.connections if c is not self and getattr(c, "waiting_for_head", bool)()]
                victim = min(idle, key=lambda c: c._opened_at) if idle else self
                victim.transport.close()
                # Not counted from now on (connection_lost comes a loop turn later), so uvicorn's concurrency check
                # does not refuse the request that made room.
                self.connections.discard(victim)
                if victim is self:
                    return
            self._arm_head_timer()

        def waiting_for_head(self) -> bool:
            """No request in progress: before the first head, between requests, or after an early answer."""
            return self.cycle is None or self.cycle.response_complete

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(header_timeout_s, self._head_timed_out)

        def _head_timed_out(self) -> None:
            if self.waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def send_400_response(self, msg: str) -> None:
            # h11 refused the request (bad head, Content-Length not an integer, head too large): the same JSON
            # error shape as every other answer of the service.
            body = json.dumps({"error": "bad_request", "message": f"the HTTP request cannot be parsed: {msg}"}).encode()
            headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
            try:
                output = self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request"))
                output += self.conn.send(h11.Data(data=body))
                output += self.conn.send(h11.EndOfMessage())
                self.transport.write(output)
            except h11.LocalProtocolError:
                pass  # a response was already started: just close
            self.transport.close()

    return GuardedH11Protocol


FILE_DESCRIPTOR_RESERVE = 64  # model files, logs, the listening socket, thread-pool pipes
# Pending connections the kernel queues, and how many asyncio accepts in one go before any of them is seen by the
# protocol (and before the connections it evicts are closed): the cap leaves room for one such burst.
ACCEPT_BACKLOG = 64


def connection_cap(requested: int) -> int:
    """The open connections this process can afford: ``requested``, or fewer when the file-descriptor limit is lower
    (after raising the soft limit toward the hard one). Past the limit accept() fails and asyncio logs every attempt."""
    try:
        import resource
    except ImportError:  # not Unix
        return requested
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = FILE_DESCRIPTOR_RESERVE + ACCEPT_BACKLOG
    wanted = requested + reserve
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft == resource.RLIM_INFINITY:
        return requested
    return max(1, min(requested, soft - reserve))


def uvicorn_config(app: Any, config: ServeConfig, log_level: str = "info") -> uvicorn.Config:
    max_connections = connection_cap(config.max_connections)
    if max_connections < config.max_connections:
        logging.getLogger("unidg.serve").warning(
            "the file-descriptor limit allows %d connections, not %d; raise it with `ulimit -n`",
            max_connections,
            config.max_connections,
        )
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        workers=1,
        access_log=False,
        http=guarded_protocol(config.header_timeout_s, max_connections),
        timeout_keep_alive=int(max(1, round(config.keep_alive_s))),
        h11_max_incomplete_event_size=config.max_header_bytes,
        # A backstop for requests in flight; connections are limited by the protocol (closing idle ones first).
        limit_concurrency=max_connections + 1,
        backlog=ACCEPT_BACKLOG,
        timeout_graceful_shutdown=10,
    )


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Run the service in the foreground (uvicorn, one process; synthesis parallelism is ``config.workers``)."""
    from unidg.runtime.serve.app import create_app

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.Server(uvicorn_config(create_app(config), config, log_level)).run()
