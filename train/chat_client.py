"""One client for OpenAI-compatible chat-completions servers (vLLM, llama.cpp's server, a hosted API), shared by the
Defect-Und judge of Consistency-RFT and the Captioner / Verifier agents of data curation.

``ChatClient.ask(body, parse)`` POSTs ``body`` to ``{url}/chat/completions`` and returns ``parse(content)`` of the first
choice's message. Robustness: an attempt that times out (``timeout_s`` for the whole answer, however slowly it
trickles in), cannot connect, gets 429 or 5xx, an answer over ``max_response_bytes`` or one that ``parse`` rejects
(``ValueError``) is retried ``retries`` times with exponential backoff (``backoff_s`` doubled each time, or the server's
Retry-After); then the error class the caller names is raised with the server and the last problem — never a silent
default. 4xx other than 429 is not retried. Parsed answers' contents are cached on disk under ``cache_dir``, keyed by
the sha256 of the request body, so a resumed run asks nothing twice. The key is read from the environment variable
``api_key_env`` (sent as a Bearer token when set).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np

from unidg.core.errors import UniDGError
from unidg.core.manifest import atomic_write_text

Answer = TypeVar("Answer")


class ChatSettings(Protocol):
    """The connection fields a chat client reads from its config section."""

    url: str
    model: str
    api_key_env: str
    timeout_s: float
    max_response_bytes: int
    retries: int
    backoff_s: float
    max_backoff_s: float
    concurrency: int
    cache_dir: str


def connection_problems(settings: ChatSettings, section: str) -> list[str]:
    """What is wrong with a section's connection fields (empty when they are usable)."""
    problems = []
    if not re.match(r"^https?://", settings.url):
        problems.append(f"{section}.url must be the API's http(s) base URL, e.g. http://127.0.0.1:8000/v1")
    if not settings.model:
        problems.append(f"{section}.model must name the model the server serves")
    for key in ("timeout_s", "backoff_s", "max_backoff_s"):
        value = getattr(settings, key)
        if not (math.isfinite(value) and value > 0):  # NaN fails every comparison: test for the good case
            problems.append(f"{section}.{key} must be a finite number of seconds > 0 (got {value})")
    if settings.max_response_bytes < 1024:
        problems.append(f"{section}.max_response_bytes must be >= 1024 (got {settings.max_response_bytes})")
    if settings.cache_dir and Path(settings.cache_dir).exists() and not Path(settings.cache_dir).is_dir():
        problems.append(f'{section}.cache_dir {settings.cache_dir} is a file; name a folder (or "": no cache)')
    if settings.retries < 0 or settings.concurrency < 1:
        problems.append(
            f"{section}.retries must be >= 0 and {section}.concurrency >= 1 (got {settings.retries}, "
            f"{settings.concurrency})"
        )
    return problems


def parse_json_answer(content: str) -> object:
    """The JSON document of a chat answer (a ```json fence around it is tolerated); ValueError when it is not JSON."""
    text = content.strip()
    fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.S)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"answer is not JSON ({error}): {content[:120]!r}") from error


def png_data_url(image: np.ndarray) -> str:
    """uint8 (H, W, 3) image or bool (H, W) mask -> data:image/png;base64,..."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class _AnswerTooLarge(Exception):
    pass


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header as seconds, or None when absent, an HTTP date or not a finite number >= 0."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class ChatClient:
    """A chat-completions client for one server and model (see the module docstring)."""

    def __init__(
        self,
        settings: ChatSettings,
        *,
        role: str,
        error: type[UniDGError],
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        import httpx  # [train] extra; the lean runtime never talks to a chat server

        self.settings = settings
        self.role = role  # names the config section in messages ("judge", "captioner[1]", "verifier")
        self.error = error
        self.endpoint = settings.url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(settings.api_key_env, "") if settings.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=settings.concurrency)
        self.client = httpx.Client(timeout=settings.timeout_s, headers=headers, limits=limits)
        self.sleep = sleep
        self.requests_sent = 0

    def close(self) -> None:
        self.client.close()

    def _cache_path(self, body: dict) -> Path | None:
        if not self.settings.cache_dir:
            return None
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return Path(self.settings.cache_dir) / digest[:2] / f"{digest}.json"

    def _read_capped(self, body: dict, abandoned: threading.Event) -> tuple[int, dict, bytes] | None:
        """POST ``body`` and read the whole answer, refusing one over ``max_response_bytes``."""
        cap = self.settings.max_response_bytes
        with self.client.stream("POST", self.endpoint, json=body) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > cap:
                raise _AnswerTooLarge(int(declared))
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                if abandoned.is_set():
                    return None
                size += len(chunk)
                if size > cap:
                    raise _AnswerTooLarge(size)
                chunks.append(chunk)
            return response.status_code, dict(response.headers), b"".join(chunks)

    def _post(self, body: dict) -> tuple[int, dict, bytes]:
        """One attempt within ``timeout_s`` in total: the read runs in its own thread, abandoned at the deadline (it
        then stops at its next chunk, or at httpx's per-read timeout if the server falls silent)."""
        outcome: queue.Queue = queue.Queue(maxsize=1)
        abandoned = threading.Event()

        def attempt() -> None:
            try:
                outcome.put((True, self._read_capped(body, abandoned)))
            except BaseException as error:  # handed to the waiting thread
                outcome.put((False, error))

        threading.Thread(target=attempt, name=f"unidg-{self.role}-request", daemon=True).start()
        try:
            ok, value = outcome.get(timeout=self.settings.timeout_s)
        except queue.Empty:
            abandoned.set()
            raise TimeoutError from None
        if not ok:
            raise value
        return value

    def _cached(self, cache: Path | None, parse: Callable[[str], Answer]) -> Answer | None:
        if cache is None or not cache.is_file():
            return None
        try:
            return parse(json.loads(cache.read_bytes())["content"])
        except (ValueError, KeyError, TypeError):  # a damaged or outdated entry is asked again and rewritten
            return None

    def ask(self, body: dict, parse: Callable[[str], Answer], sample: str = "") -> Answer:
        """``parse`` of the answer's content, from the cache or from the server with retries."""
        import httpx

        cache = self._cache_path(body)
        cached = self._cached(cache, parse)
        if cached is not None:
            return cached
        settings, role = self.settings, self.role
        problem = ""
        retry_after: float | None = None
        for attempt in range(settings.retries + 1):
            if attempt:
                backoff = settings.backoff_s * 2 ** (attempt - 1)
                self.sleep(min(backoff if retry_after is None else retry_after, settings.max_backoff_s))
            retry_after = None
            try:
                self.requests_sent += 1
                status, headers, data = self._post(body)
            except (httpx.TimeoutException, TimeoutError):
                problem = f"no answer within {settings.timeout_s} s ({role}.timeout_s, for the whole answer)"
                continue
            except _AnswerTooLarge as error:
                problem = (
                    f"an answer of {error} bytes or more, over {role}.max_response_bytes={settings.max_response_bytes}"
                )
                continue
            except httpx.TransportError as error:
                problem = f"cannot reach the server ({type(error).__name__}: {error})"
                continue
            if status == 429 or status >= 500:
                problem = f"HTTP {status}"
                retry_after = retry_after_seconds(headers.get("retry-after"))  # absent, a date, nan: the backoff
                continue
            if status >= 400:
                raise self.error(
                    f"{role} {self.endpoint} refused sample {sample!r}: HTTP {status} "
                    f"{data[:200].decode(errors='replace')!r}; check {role}.model, {role}.url and the key in "
                    f"${settings.api_key_env}"
                )
            try:
                content = json.loads(data)["choices"][0]["message"]["content"]
                answer = parse(content)
            except (ValueError, KeyError, IndexError, TypeError) as error:
                problem = f"malformed answer: {error}"
                continue
            if cache is not None:
                try:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(cache, json.dumps({"content": content}) + "\n")
                except OSError as error:
                    raise self.error(
                        f"{role}.cache_dir {settings.cache_dir}: cannot write {cache} ({error.strerror or error}); "
                        'name a writable folder, or "" for no cache'
                    ) from error
            return answer
        raise self.error(
            f"{role} {self.endpoint} could not answer for sample {sample!r} after {settings.retries + 1} attempts: "
            f"{problem}. Check that the server is up and answers the expected JSON; the run can be resumed"
        )
