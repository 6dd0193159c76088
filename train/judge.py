"""Defect-Und reward: a multimodal judge behind any OpenAI-compatible chat-completions API (vLLM, llama.cpp's
server, a hosted one), asked the paper's Fig. 12 rubric about each generated sample.

Each sample is one POST to ``{url}/chat/completions``: the Fig. 12 system prompt, then the reference image, the
reference mask, the generated target and the target mask as PNG data URLs (base64). The answer must be the rubric's
JSON object (``Analysis`` plus the four scores in [0, 5], a bare number or a one-element list as in Fig. 12); it is
validated with pydantic, whose JSON schema is also sent as ``response_format`` where the server supports structured
output. The score is the mean of the four scores / 5.

Robustness: every attempt has a total deadline of ``timeout_s`` (a server that trickles bytes cannot hold a run) and
its answer may not pass ``max_response_bytes`` (an endless body cannot fill the memory). A request that times out,
fails to connect, gets 429 or 5xx, or gets an answer that is not valid rubric
JSON is retried ``retries`` times with exponential backoff (``backoff_s``, doubled each time, or the server's
Retry-After when it sends one); after that the sample raises ``JudgeError`` naming the server and the last problem
(never a silent zero). 4xx other than 429 is not retried. ``concurrency`` requests run at once. Valid answers are
cached on disk under ``cache_dir``, keyed by the sha256 of the request body, so a resumed run asks nothing twice.
The API key is read from the environment variable named by ``api_key_env`` (sent as a Bearer token when set).
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from unidg.core.errors import UniDGError
from unidg.core.manifest import atomic_write_text
from unidg.train.config import ConfigError
from unidg.train.reward_interface import RewardOutput

DIMENSIONS = ("Reference Adherence", "Consistency", "Reasonability", "Overall Quality")

SYSTEM_PROMPT = """You are an expert quality assessor for industrial defect transfer and image editing tasks. Your \
role is to evaluate how well defects from reference images have been transferred onto target images.
## TASK CONTEXT
You will be provided with:
- Reference Image: Contains the original defect - Reference Mask: Highlights the defect region in the reference image \
- Target Image: The edited result where the defect has been transferred - Target Mask: Highlights where the defect \
should appear in the target image
- Scenario: A description of the industrial context in which the defect transfer is being evaluated
Your objective is to evaluate the quality of the defect transfer by analyzing the target image against the reference \
image.
## EVALUATION CRITERIA
### 1. Reference Adherence (Score: 0.0 - 5.0)
Evaluate how accurately the generated defect in the target mask region matches the reference defect in the reference \
mask region. Consider defect identity, color fidelity, shape accuracy and texture preservation.
Scoring Guide: 4.0-5.0 excellent match across all aspects; 3.0-3.9 good match with minor deviations in one aspect; \
2.0-2.9 moderate match with noticeable differences in 2+ aspects; 1.0-1.9 poor match with significant deviations; \
0.0-0.9 minimal or no resemblance to reference defect.
### 2. Consistency (Score: 0.0 - 5.0)
Evaluate how seamlessly the edited region integrates with the surrounding areas of the target image: texture \
blending, illumination matching, edge transitions, material continuity.
Scoring Guide: 4.0-5.0 seamless integration; 3.0-3.9 well-integrated with minimal noticeable transitions; 2.0-2.9 \
some visible seams or lighting mismatches; 1.0-1.9 obvious artifacts or discontinuities; 0.0-0.9 severe \
inconsistencies, clearly distinguishable edited region.
### 3. Reasonability (Score: 0.0 - 5.0)
Assess whether the transferred defect appears plausible and natural in the context of the target image: contextual \
plausibility, physical realism, scale appropriateness, logical placement.
Scoring Guide: 4.0-5.0 highly realistic and contextually appropriate; 3.0-3.9 minor implausibilities; 2.0-2.9 \
noticeable unrealistic elements; 1.0-1.9 questionable realism or contextual fit; 0.0-0.9 highly unrealistic.
### 4. Overall Quality (Score: 0.0 - 5.0)
Evaluate the holistic visual quality of the final target image: realism, visual fidelity, professional appearance.
Scoring Guide: 4.0-5.0 exceptional quality, indistinguishable from real defect photographs; 3.0-3.9 high quality \
with minor imperfections; 2.0-2.9 acceptable quality with visible flaws; 1.0-1.9 below acceptable quality; 0.0-0.9 \
poor quality, unsuitable for practical use.
## OUTPUT FORMAT
You must provide your evaluation in the following JSON format exactly:
{"Analysis": "<at most 80 words: (1) Reference Adherence, (2) Consistency, (3) Reasonability, (4) Overall Quality>", \
"Reference Adherence": [score], "Consistency": [score], "Reasonability": [score], "Overall Quality": [score]}
## IMPORTANT NOTES
- Scores must be floating-point numbers between 0.0 and 5.0
- Be objective and consistent; focus on observable visual qualities
Now, please carefully examine the provided images and masks, and deliver your evaluation in the specified JSON \
format."""


class JudgeError(UniDGError):
    """The judge could not score a sample (after retries); the message names the server and the last problem."""


def _one_score(value: object) -> object:
    if isinstance(value, list):  # Fig. 12 writes "[4.8]"
        if len(value) != 1:
            raise ValueError(f"expected one score, got a list of {len(value)}")
        return value[0]
    return value


Score = Annotated[float, Field(ge=0.0, le=5.0)]


class RubricAnswer(BaseModel):
    """The Fig. 12 answer."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    analysis: str = Field(alias="Analysis")
    reference_adherence: Score = Field(alias="Reference Adherence")
    consistency: Score = Field(alias="Consistency")
    reasonability: Score = Field(alias="Reasonability")
    overall_quality: Score = Field(alias="Overall Quality")

    @field_validator("reference_adherence", "consistency", "reasonability", "overall_quality", mode="before")
    @classmethod
    def _unwrap(cls, value: object) -> object:
        return _one_score(value)

    def scores(self) -> dict[str, float]:
        values = (self.reference_adherence, self.consistency, self.reasonability, self.overall_quality)
        return dict(zip(DIMENSIONS, values))


def answer_schema() -> dict:
    """The JSON schema sent as ``response_format`` (scores as plain numbers, which the validator also accepts)."""
    number = {"type": "number", "minimum": 0.0, "maximum": 5.0}
    properties = {"Analysis": {"type": "string"}, **{name: number for name in DIMENSIONS}}
    return {
        "type": "object",
        "properties": properties,
        "required": ["Analysis", *DIMENSIONS],
        "additionalProperties": False,
    }


def parse_answer(content: str) -> RubricAnswer:
    """The rubric JSON of a chat answer (a ```json fence around it is tolerated); ValueError when it is not valid."""
    text = content.strip()
    fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.S)
    if fenced:
        text = fenced.group(1)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"answer is not JSON ({error}): {content[:120]!r}") from error
    try:
        return RubricAnswer.model_validate(document)
    except ValidationError as error:
        raise ValueError(f"answer does not follow the rubric schema: {error.errors()[0]['msg']}") from error


def png_data_url(image: np.ndarray) -> str:
    """uint8 (H, W, 3) image or bool (H, W) mask -> data:image/png;base64,..."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class JudgeConfig:
    weight: float = 0.0  # weight of this term in the combined reward (0: off; paper w_gen = 0.5)
    url: str = ""  # base URL of the API, e.g. http://127.0.0.1:8000/v1 (POSTs go to URL/chat/completions)
    model: str = ""  # model name the server serves (e.g. a Defect-Und Qwen3-VL checkpoint)
    api_key_env: str = "UNIDG_JUDGE_API_KEY"  # environment variable holding the key ("" or unset: no key sent)
    timeout_s: float = 60.0  # per attempt, in total (connecting, sending, waiting and reading the whole answer)
    max_response_bytes: int = 1 << 20  # a rubric answer is a few KB; a larger body is abandoned
    retries: int = 4  # extra attempts after the first
    backoff_s: float = 1.0  # first wait between attempts; doubled each time (or the server's Retry-After)
    max_backoff_s: float = 30.0
    concurrency: int = 4  # requests in flight at once
    cache_dir: str = ""  # on-disk cache of valid answers ("": no cache)
    structured_output: bool = True  # send the JSON schema as response_format (OpenAI json_schema)
    max_tokens: int = 512
    temperature: float = 0.0
    scenario: str = "industrial surface inspection: a defect from the reference is transferred into the target"

    def validate(self, where: str) -> None:
        if not re.match(r"^https?://", self.url):
            raise ConfigError(f"{where}: judge.url must be the API's http(s) base URL, e.g. http://127.0.0.1:8000/v1")
        if not self.model:
            raise ConfigError(f"{where}: judge.model must name the model the server serves")
        for key in ("timeout_s", "backoff_s", "max_backoff_s"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):  # NaN fails every comparison: test for the good case
                raise ConfigError(f"{where}: judge.{key} must be a finite number of seconds > 0 (got {value})")
        if not (math.isfinite(self.weight) and math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(
                f"{where}: judge.weight and judge.temperature must be finite, temperature >= 0 "
                f"(got {self.weight}, {self.temperature})"
            )
        if self.max_response_bytes < 1024:
            raise ConfigError(f"{where}: judge.max_response_bytes must be >= 1024 (got {self.max_response_bytes})")
        if self.cache_dir and Path(self.cache_dir).exists() and not Path(self.cache_dir).is_dir():
            raise ConfigError(f'{where}: judge.cache_dir {self.cache_dir} is a file; name a folder (or "": no cache)')
        if self.retries < 0 or self.concurrency < 1 or self.max_tokens < 1:
            raise ConfigError(
                f"{where}: judge.retries must be >= 0, judge.concurrency >= 1 and judge.max_tokens >= 1 (got "
                f"{self.retries}, {self.concurrency}, {self.max_tokens})"
            )


class _AnswerTooLarge(Exception):
    pass


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header as seconds, or None when absent, an HTTP date or not a finite number >= 0."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class DefectUndJudge:
    """The Defect-Und reward (see the module docstring)."""

    name = "judge"

    def __init__(self, config: JudgeConfig, sleep=time.sleep) -> None:
        import httpx

        config.validate("judge")
        self.config = config
        self.endpoint = config.url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        limits = httpx.Limits(max_connections=config.concurrency)
        self.client = httpx.Client(timeout=config.timeout_s, headers=headers, limits=limits)
        self.sleep = sleep
        self.requests_sent = 0

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ one sample
    def request_body(self, reference, reference_mask, generated, target_mask) -> dict:
        config = self.config
        images = [
            ("Reference Image:", reference),
            ("Reference Mask:", reference_mask),
            ("Target Image:", generated),
            ("Target Mask:", target_mask),
        ]
        content: list[dict] = [{"type": "text", "text": f"Scenario: {config.scenario}"}]
        for label, image in images:
            content.append({"type": "text", "text": label})
            content.append({"type": "image_url", "image_url": {"url": png_data_url(image)}})
        body = {
            "model": config.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}],
            "max_tokens": config.max_tokens,
            "temperature": config.temperature,
        }
        if config.structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "defect_und_rubric", "schema": answer_schema(), "strict": True},
            }
        return body

    def _cache_path(self, body: dict) -> Path | None:
        if not self.config.cache_dir:
            return None
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return Path(self.config.cache_dir) / digest[:2] / f"{digest}.json"

    def _read_capped(self, body: dict, abandoned: threading.Event) -> tuple[int, dict, bytes] | None:
        """POST ``body`` and read the whole answer, refusing one over ``max_response_bytes``."""
        cap = self.config.max_response_bytes
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

        threading.Thread(target=attempt, name="unidg-judge-request", daemon=True).start()
        try:
            ok, value = outcome.get(timeout=self.config.timeout_s)
        except queue.Empty:
            abandoned.set()
            raise TimeoutError from None
        if not ok:
            raise value
        return value

    def ask(self, body: dict, sample: str = "") -> RubricAnswer:
        """One rubric answer for a request body: from the cache, or from the server with retries."""
        import httpx

        cache = self._cache_path(body)
        if cache is not None and cache.is_file():
            try:
                return RubricAnswer.model_validate(json.loads(cache.read_bytes()))
            except (ValueError, ValidationError):  # a damaged cache entry is asked again and rewritten
                pass
        config = self.config
        problem = ""
        retry_after: float | None = None
        for attempt in range(config.retries + 1):
            if attempt:
                backoff = config.backoff_s * 2 ** (attempt - 1)
                self.sleep(min(backoff if retry_after is None else retry_after, config.max_backoff_s))
            retry_after = None
            try:
                self.requests_sent += 1
                status, headers, data = self._post(body)
            except (httpx.TimeoutException, TimeoutError):
                problem = f"no answer within {config.timeout_s} s (judge.timeout_s, for the whole answer)"
                continue
            except _AnswerTooLarge as error:
                problem = (
                    f"an answer of {error} bytes or more, over judge.max_response_bytes={config.max_response_bytes}"
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
                raise JudgeError(
                    f"judge {self.endpoint} refused sample {sample!r}: HTTP {status} "
                    f"{data[:200].decode(errors='replace')!r}; check judge.model, judge.url and the key in "
                    f"${config.api_key_env}"
                )
            try:
                content = json.loads(data)["choices"][0]["message"]["content"]
                answer = parse_answer(content)
            except (ValueError, KeyError, IndexError, TypeError) as error:
                problem = f"malformed answer: {error}"
                continue
            if cache is not None:
                try:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(cache, json.dumps(answer.model_dump(by_alias=True)) + "\n")
                except OSError as error:
                    raise JudgeError(
                        f"judge.cache_dir {config.cache_dir}: cannot write {cache} ({error.strerror or error}); "
                        'name a writable folder, or "" for no cache'
                    ) from error
            return answer
        raise JudgeError(
            f"judge {self.endpoint} could not score sample {sample!r} after {config.retries + 1} attempts: {problem}. "
            "Check that the server is up and answers the rubric JSON; the run can be resumed"
        )

    # ------------------------------------------------------------------ the reward
    def score(self, inputs):

        bodies = [
            self.request_body(inputs.reference[b], inputs.reference_mask[b], inputs.generated[b], inputs.target_mask[b])
            for b in range(inputs.batch)
        ]
        with ThreadPoolExecutor(max_workers=self.config.concurrency) as pool:
            answers = list(pool.map(self.ask, bodies, inputs.ids))
        per_dimension = {name: np.array([answer.scores()[name] for answer in answers]) for name in DIMENSIONS}
        scores = np.mean([per_dimension[name] for name in DIMENSIONS], axis=0) / 5.0
        return RewardOutput(scores, per_dimension)
