"""Stand-ins for an OpenAI-compatible chat-completions service (judge, captioner, verifier) the tests share."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def reply_chat(handler: BaseHTTPRequestHandler, content: str) -> None:
    """Answer a chat-completions request with one assistant message holding ``content``."""
    payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


@contextmanager
def chat_server(handler: type[BaseHTTPRequestHandler], *, daemon_threads: bool = False) -> Iterator[str]:
    """``handler`` served on a free loopback port for the block; yields its ``/v1`` base URL."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = daemon_threads
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
