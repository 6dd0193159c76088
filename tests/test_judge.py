"""The Defect-Und judge against a real local HTTP server that answers like an OpenAI-compatible chat API
(127.0.0.1 only): deterministic answers, malformed JSON, 429s, 5xx, timeouts, the cache and the key."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest
from chat_fixtures import chat_server, reply_chat
from PIL import Image

from unidg.train.config import ConfigError
from unidg.train.judge import DIMENSIONS, DefectUndJudge, JudgeConfig, JudgeError, parse_answer
from unidg.train.rewards import RewardInputs


def _brightness(data_url: str) -> float:
    png = base64.b64decode(data_url.split(",", 1)[1])
    return float(np.asarray(Image.open(io.BytesIO(png))).mean())


class FakeJudge(BaseHTTPRequestHandler):
    """Scores are a function of the target image (its mean brightness), so they are deterministic and checkable.
    ``script`` lists what the next requests get: "ok", "garbage", "schema", "429", "500", "slow", "401"."""

    script: list[str] = []
    seen: list[dict] = []
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            FakeJudge.seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
            action = FakeJudge.script.pop(0) if FakeJudge.script else "ok"
        if action == "slow":
            threading.Event().wait(1.0)
            action = "ok"
        if action in ("429", "500", "401", "429nan"):
            self.send_response(int(action[:3]))
            if action.startswith("429"):
                self.send_header("Retry-After", "nan" if action == "429nan" else "0")
            self.end_headers()
            self.wfile.write(b'{"error": "busy"}')
            return
        images = [part["image_url"]["url"] for part in body["messages"][1]["content"] if part["type"] == "image_url"]
        target = _brightness(images[2])
        score = round(5.0 * target / 255.0, 3)
        answer = {"Analysis": "ok", **{name: [score] for name in DIMENSIONS}}
        content = {"garbage": "Sure! The scores are great.", "schema": json.dumps({"Analysis": "x"})}.get(
            action, "```json\n" + json.dumps(answer) + "\n```"
        )
        reply_chat(self, content)


@pytest.fixture()
def server():
    FakeJudge.script, FakeJudge.seen = [], []
    with chat_server(FakeJudge) as url:
        yield url


def _inputs(levels=(51, 204)) -> RewardInputs:
    batch = len(levels)
    reference = np.full((batch, 16, 16, 3), 128, dtype=np.uint8)
    masks = np.zeros((batch, 16, 16), dtype=bool)
    masks[:, 4:8, 4:8] = True
    generated = np.stack([np.full((16, 16, 3), level, dtype=np.uint8) for level in levels])
    return RewardInputs(reference, masks, generated, masks, ids=[f"s{i}" for i in range(batch)])


def _judge(url: str, **options) -> DefectUndJudge:
    settings = {"url": url, "model": "defect-und-4b", "backoff_s": 0.01, "retries": 2, "timeout_s": 5.0}
    return DefectUndJudge(JudgeConfig(weight=0.5, **{**settings, **options}))


def test_scores_follow_the_answers_and_requests_carry_the_rubric_and_images(server, monkeypatch) -> None:
    monkeypatch.setenv("UNIDG_JUDGE_API_KEY", "sk-test")
    judge = _judge(server, concurrency=2)
    output = judge.score(_inputs())
    assert output.scores.tolist() == pytest.approx([51 / 255, 204 / 255], abs=1e-3)  # mean of four / 5
    assert output.details["Consistency"].tolist() == pytest.approx([1.0, 4.0], abs=1e-3)
    request = FakeJudge.seen[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    body = request["body"]
    assert body["model"] == "defect-und-4b" and "Reference Adherence" in body["messages"][0]["content"]
    images = [p for p in body["messages"][1]["content"] if p["type"] == "image_url"]
    assert len(images) == 4 and all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in images)
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["Analysis", *DIMENSIONS]
    judge.close()


def test_malformed_answers_429_and_5xx_are_retried(server) -> None:
    waits: list[float] = []
    FakeJudge.script = ["garbage", "429", "500"]
    judge = DefectUndJudge(
        JudgeConfig(weight=1.0, url=server, model="m", backoff_s=0.5, retries=3, timeout_s=5.0), sleep=waits.append
    )
    output = judge.score(_inputs((102,)))
    assert output.scores.tolist() == pytest.approx([0.4], abs=1e-3)
    assert judge.requests_sent == 4
    assert waits == [0.5, 0.0, 2.0]  # backoff doubling per attempt; the 429's Retry-After: 0 is honoured
    judge.close()


def test_exhausted_retries_raise_a_clear_error(server) -> None:
    FakeJudge.script = ["schema"] * 3
    judge = _judge(server, retries=2)
    with pytest.raises(JudgeError, match="after 3 attempts: malformed answer"):
        judge.score(_inputs((10,)))
    FakeJudge.script = ["401"]
    with pytest.raises(JudgeError, match="HTTP 401"):
        judge.score(_inputs((10,)))
    assert len(FakeJudge.seen) == 4  # 401 is not retried
    judge.close()


def test_timeouts_are_retried_then_reported(server) -> None:
    FakeJudge.script = ["slow", "slow"]
    judge = _judge(server, timeout_s=0.2, retries=1)
    with pytest.raises(JudgeError, match="no answer within 0.2 s"):
        judge.score(_inputs((10,)))
    judge.close()


def test_a_server_that_is_down_is_reported(server) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port with nothing listening
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = _judge(f"http://127.0.0.1:{port}/v1", retries=1)
    with pytest.raises(JudgeError, match="cannot reach the server"):
        judge.score(_inputs((10,)))
    judge.close()


def test_valid_answers_are_cached_on_disk(server, tmp_path) -> None:
    judge = _judge(server, cache_dir=str(tmp_path / "cache"))
    first = judge.score(_inputs())
    assert len(FakeJudge.seen) == 2
    again = _judge(server, cache_dir=str(tmp_path / "cache")).score(_inputs())
    assert len(FakeJudge.seen) == 2 and again.scores.tolist() == first.scores.tolist()
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 2
    judge.score(_inputs((77,)))  # a new sample is asked
    assert len(FakeJudge.seen) == 3


def test_parse_answer_accepts_fig12_lists_and_refuses_out_of_range() -> None:
    answer = parse_answer(
        '{"Analysis": "a", "Reference Adherence": [4.8], "Consistency": 4.9, '
        '"Reasonability": [4.9], "Overall Quality": 5}'
    )
    assert answer.scores() == {
        "Reference Adherence": 4.8,
        "Consistency": 4.9,
        "Reasonability": 4.9,
        "Overall Quality": 5.0,
    }
    with pytest.raises(ValueError, match="rubric schema"):
        parse_answer(
            '{"Analysis": "a", "Reference Adherence": 7, "Consistency": 1, "Reasonability": 1, "Overall Quality": 1}'
        )
    with pytest.raises(ValueError, match="not JSON"):
        parse_answer("{broken")


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="judge.url"):
        DefectUndJudge(JudgeConfig(weight=1.0, url="localhost:8000", model="m"))
    with pytest.raises(ConfigError, match="judge.model"):
        DefectUndJudge(JudgeConfig(weight=1.0, url="http://127.0.0.1:1/v1"))


class HostileJudge(BaseHTTPRequestHandler):
    """A judge that answers 200 and then either trickles one byte a second or sends a body without end (both bounded
    here: 30 bytes, 1 GiB), on 127.0.0.1 only."""

    mode = "trickle"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()  # no Content-Length: the body runs until the connection closes
        try:
            if HostileJudge.mode == "trickle":
                for _ in range(30):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(1.0)
            else:
                chunk = b" " * 65536
                for _ in range(16384):
                    self.wfile.write(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: what is asked of it
            pass


@pytest.fixture()
def hostile():
    with chat_server(HostileJudge, daemon_threads=True) as url:
        yield url


def test_a_judge_that_trickles_one_byte_a_second_is_cut_at_the_total_deadline(hostile) -> None:
    HostileJudge.mode = "trickle"
    judge = _judge(hostile, timeout_s=1.5, retries=1)
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"after 2 attempts: no answer within 1.5 s \(judge.timeout_s"):
        judge.score(_inputs((10,)))
    assert time.monotonic() - started < 2 * 1.5 + 1.0  # two attempts of 1.5 s and the backoff, not 30 s each
    judge.close()


def test_an_endless_answer_is_cut_at_the_size_cap(hostile) -> None:
    HostileJudge.mode = "endless"
    judge = _judge(hostile, retries=1, max_response_bytes=1 << 16)
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"over judge.max_response_bytes=65536"):
        judge.score(_inputs((10,)))
    assert time.monotonic() - started < 5.0
    judge.close()


def test_retry_after_nan_uses_the_backoff(server) -> None:
    waits: list[float] = []
    FakeJudge.script = ["429nan"]
    config = JudgeConfig(weight=1.0, url=server, model="m", backoff_s=0.25, retries=1, timeout_s=5.0)
    judge = DefectUndJudge(config, sleep=waits.append)
    assert judge.score(_inputs((102,))).scores.tolist() == pytest.approx([0.4], abs=1e-3)
    assert waits == [0.25]
    judge.close()


def test_bad_timeouts_and_a_cache_dir_that_is_a_file_are_refused(server, tmp_path) -> None:
    for key, value in (("timeout_s", float("nan")), ("timeout_s", float("inf")), ("backoff_s", float("nan"))):
        with pytest.raises(ConfigError, match=f"judge.{key} must be a finite number of seconds > 0"):
            _judge(server, **{key: value})
    blocker = tmp_path / "cache.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"judge.cache_dir .*cache.txt is a file; name a folder"):
        _judge(server, cache_dir=str(blocker))


def test_a_damaged_cache_entry_is_asked_again(server, tmp_path) -> None:
    judge = _judge(server, cache_dir=str(tmp_path / "cache"))
    first = judge.score(_inputs((77,)))
    (entry,) = (tmp_path / "cache").rglob("*.json")
    entry.write_bytes(b"\xff\x00 not json")
    assert judge.score(_inputs((77,))).scores.tolist() == first.scores.tolist()
    assert len(FakeJudge.seen) == 2 and parse_answer(json.loads(entry.read_text())["content"]).analysis == "ok"
    judge.close()
