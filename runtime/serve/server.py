"""The HTTP server under the app: uvicorn (h11) with connection limits and read timeouts.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and limits the size of a request head that is still
incomplete (h11), but waits forever for a connection that never sends a complete request head, keeps every connection
it accepts, and takes a head of any size that arrives in one read. The protocol below adds the three: heads over
``max_header_bytes`` are refused however they arrive, a connection gets ``header_timeout_s`` for each request head,
and beyond ``max_connections`` the longest-idle connection (no request in progress) is closed to make room — or the
new one, when every connection is busy.
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

from unidg.runtime.serve.app import create_app
from unidg.runtime.serve.config import ServeConfig

HEAD_END = b"\r\n\r\n"


def guarded_protocol(header_timeout_s: float, max_connections: int, max_header_bytes: int) -> type[asyncio.Protocol]:
    class GuardedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _opened_at = 0.0
        _head_bytes = 0  # of the request head being received; -1 once it is complete (until the next one starts)
        _head_tail = b""  # the last bytes seen, for an end of head split across two reads

        def data_received(self, data: bytes) -> None:
            # h11's own limit applies only to a head that is still incomplete in its buffer: a larger head arriving
            # in one read passed. Count the head's bytes here, whichever way they arrive.
            if self.conn.their_state is h11.IDLE:  # the client is between requests: this starts (or is) a head
                if self._head_bytes < 0:
                    self._head_bytes, self._head_tail = 0, b""
                seen = self._head_tail + data
                end = seen.find(HEAD_END)
                size = self._head_bytes + (len(data) if end < 0 else end + len(HEAD_END) - len(self._head_tail))
                if size > max_header_bytes:
                    self._refuse_head(size)
                    return
                self._head_bytes, self._head_tail = (size, seen[-3:]) if end < 0 else (-1, b"")
            super().data_received(data)

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

        def _refuse_head(self, size: int) -> None:
            # No request was parsed, so h11 has nothing to answer: the 400 is written as it goes on the wire.
            message = f"the HTTP request cannot be parsed: the request head is over {max_header_bytes} bytes"
            body = json.dumps({"error": "bad_request", "message": message}).encode()
            head = (
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            )
            self.transport.write(head.encode() + body)
            self.transport.close()
            self._head_bytes = size

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
        http=guarded_protocol(config.header_timeout_s, max_connections, config.max_header_bytes),
        timeout_keep_alive=int(max(1, round(config.keep_alive_s))),
        h11_max_incomplete_event_size=config.max_header_bytes,
        # A backstop for requests in flight; connections are limited by the protocol (closing idle ones first).
        limit_concurrency=max_connections + 1,
        backlog=ACCEPT_BACKLOG,
        timeout_graceful_shutdown=10,
    )


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Run the service in the foreground (uvicorn, one process; synthesis parallelism is ``config.workers``)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.Server(uvicorn_config(create_app(config), config, log_level)).run()
