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

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from unidg.core.errors import UniDGError
from unidg.train.chat_client import ChatClient, connection_problems, parse_json_answer, png_data_url
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


class ScoredAnswer(BaseModel):
    """A vision-language model's JSON answer (judge, verifier): its 'Analysis' and scores 0..5 under their display
    names; other keys are ignored."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    analysis: str = Field(alias="Analysis")


class RubricAnswer(ScoredAnswer):
    """The Fig. 12 answer."""

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
    document = parse_json_answer(content)
    try:
        return RubricAnswer.model_validate(document)
    except ValidationError as error:
        raise ValueError(f"answer does not follow the rubric schema: {error.errors()[0]['msg']}") from error


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
        problems = connection_problems(self, "judge")
        if not (math.isfinite(self.weight) and math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(
                f"judge.weight and judge.temperature must be finite, temperature >= 0 (got {self.weight}, "
                f"{self.temperature})"
            )
        if self.max_tokens < 1:
            problems.append(f"judge.max_tokens must be >= 1 (got {self.max_tokens})")
        if problems:
            raise ConfigError(f"{where}: {problems[0]}")


class DefectUndJudge:
    """The Defect-Und reward (see the module docstring)."""

    name = "judge"

    def __init__(self, config: JudgeConfig, sleep=time.sleep) -> None:
        config.validate("judge")
        self.config = config
        self.chat = ChatClient(config, role="judge", error=JudgeError, sleep=sleep)
        self.endpoint = self.chat.endpoint

    @property
    def requests_sent(self) -> int:
        return self.chat.requests_sent

    def close(self) -> None:
        self.chat.close()

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

    def ask(self, body: dict, sample: str = "") -> RubricAnswer:
        """One rubric answer for a request body: from the cache, or from the server with retries."""
        return self.chat.ask(body, parse_answer, sample)

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
