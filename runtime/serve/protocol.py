"""The request/response protocol of ``POST /v1/synthesize``, free of any web framework: the ``params`` JSON, the
``prompt`` text (UniDG-Text bundles), the four uploads (decoded through ``unidg.core.images``; the reference pair is
optional beside a prompt), the request id, and the JSON error shape."""

from __future__ import annotations

import io
import json
import math
import re
import secrets
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from unidg.core.images import (
    REFERENCE_IMAGE,
    REFERENCE_MASK,
    SOURCE_IMAGE,
    TARGET_MASK,
    ImageTooLarge,
    InputError,
    decode_upload,
    validate_request,
)
from unidg.core.settings import UniDGSettings
from unidg.runtime.sampler import DEFAULT_SEED, MAX_SEED
from unidg.runtime.synthesizer import RequestError, SynthesisRequest, check_request_options

# Multipart field of each input, and the name the runtime's InputError uses for it.
UPLOAD_FIELDS: dict[str, str] = {
    "reference": REFERENCE_IMAGE,
    "reference_mask": REFERENCE_MASK,
    "source": SOURCE_IMAGE,
    "mask": TARGET_MASK,
}
FIELD_OF_INPUT = {name: upload for upload, name in UPLOAD_FIELDS.items()}
REFERENCE_FIELDS = ("reference", "reference_mask")  # optional together beside a prompt (UniDG-Text)
PROMPT_FIELD = "prompt"  # a text field of its own: the instruction, UTF-8
TEXT_FIELDS = ("params", PROMPT_FIELD)
PARAM_NAMES = ("seed", "steps", "guidance", "category")
MAX_CATEGORY_CHARS = 64
MAX_PARAMS_DEPTH = 4  # params is a flat object; anything nested deeper is refused before json.loads sees it
# A client's own id for a request (echoed in the reply and the logs): printable ASCII without spaces, bounded.
REQUEST_ID_PATTERN = re.compile(r"[\x21-\x7e]{1,128}")


class ServiceError(Exception):
    """An error answered as JSON ``{"error": code, "field": ..., "message": ...}`` with an HTTP status."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, headers: dict | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict:
        body = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


@dataclass(frozen=True)
class SynthesisParams:
    """Per-request sampling choices; None means the bundle's default."""

    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    category: str | None = None
    prompt: str | None = None  # the ``prompt`` field (UniDG-Text bundles)


@dataclass
class SynthesisInputs:
    reference: np.ndarray | None  # None with reference_mask: a prompt alone
    reference_mask: np.ndarray | None
    source: np.ndarray
    target_mask: np.ndarray


def request_id_from(header: str | None) -> str:
    """The client's X-Request-ID when it is one (printable ASCII, at most 128 characters), else a fresh id."""
    if header is None or not header:
        return secrets.token_hex(16)
    if REQUEST_ID_PATTERN.fullmatch(header) is None:
        raise ServiceError(
            400,
            "invalid_request_id",
            "X-Request-ID must be 1 to 128 printable ASCII characters without spaces",
            "X-Request-ID",
        )
    return header


def _nesting_depth(text: str) -> int:
    """The deepest bracket nesting of a JSON text, counting only brackets outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def parse_params(text: str | None, max_steps: int) -> SynthesisParams:
    """The optional JSON ``params`` field: ``{"seed": int, "steps": int, "guidance": float, "category": str}``."""
    if text is None or not text.strip():
        return SynthesisParams()
    if _nesting_depth(text) > MAX_PARAMS_DEPTH:
        raise ServiceError(400, "invalid_params", "params is nested too deeply; send a flat JSON object", "params")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise ServiceError(400, "invalid_params", f"params is not valid JSON ({error})", "params") from error
    except ValueError as error:  # an integer beyond Python's digit limit (4300)
        raise ServiceError(
            400, "invalid_params", "params holds a number too long to read; seeds are at most 19 digits", "params"
        ) from error
    except RecursionError as error:
        raise ServiceError(
            400, "invalid_params", "params is nested too deeply; send a flat JSON object", "params"
        ) from error
    if not isinstance(raw, dict):
        raise ServiceError(400, "invalid_params", "params must be a JSON object", "params")
    if PROMPT_FIELD in raw:
        raise ServiceError(
            422,
            "invalid_params",
            "the prompt is not a param: send it as its own text field 'prompt'",
            f"params.{PROMPT_FIELD}",
        )
    unknown = sorted(set(raw) - set(PARAM_NAMES))
    if unknown:
        raise ServiceError(
            422, "invalid_params", f"unknown params {unknown}; known: {list(PARAM_NAMES)}", f"params.{unknown[0]}"
        )

    def integer(name: str, low: int, high: int) -> int | None:
        value = raw.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            shown = (
                value
                if not isinstance(value, int) or abs(value) < 10**30
                else f"an integer of {len(str(value))} digits"
            )
            raise ServiceError(
                422, "invalid_params", f"{name} must be an integer in [{low}, {high}] (got {shown!r})", f"params.{name}"
            )
        return value

    guidance = raw.get("guidance")
    if guidance is not None:
        if isinstance(guidance, bool) or not isinstance(guidance, int | float) or not math.isfinite(guidance):
            raise ServiceError(
                422, "invalid_params", f"guidance must be a finite number (got {guidance!r})", "params.guidance"
            )
        if not 0 <= guidance <= 1000:
            raise ServiceError(
                422, "invalid_params", f"guidance must be in [0, 1000] (got {guidance})", "params.guidance"
            )
        guidance = float(guidance)
    category = raw.get("category")
    if category is not None and (not isinstance(category, str) or not 0 < len(category) <= MAX_CATEGORY_CHARS):
        raise ServiceError(
            422,
            "invalid_params",
            f"category must be a non-empty string of at most {MAX_CATEGORY_CHARS} characters (got {category!r})",
            "params.category",
        )
    return SynthesisParams(
        seed=integer("seed", 0, MAX_SEED), steps=integer("steps", 1, max_steps), guidance=guidance, category=category
    )


def text_field(fields: dict[str, bytes | str], name: str) -> str | None:
    value = fields.get(name)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ServiceError(400, "invalid_params", f"{name} is not UTF-8 text", name) from error
    return value


def prompt_field(fields: dict[str, bytes | str]) -> str | None:
    """The ``prompt`` field: text (a file part must hold UTF-8); None when the form has none."""
    value = fields.get(PROMPT_FIELD)
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ServiceError(
                422, "invalid_prompt", "prompt must be UTF-8 text; send the instruction as UTF-8", PROMPT_FIELD
            ) from error
    return value


def upload_files(fields: dict[str, bytes | str]) -> dict[str, bytes]:
    """The uploads of a multipart form, checked for presence, type and unknown fields (nothing decoded): all four, or
    with a ``prompt`` field, source and mask with the reference pair optional (both or neither)."""
    unknown = sorted(set(fields) - set(UPLOAD_FIELDS) - set(TEXT_FIELDS))
    if unknown:
        raise ServiceError(
            422,
            "invalid_input",
            f"unknown field(s) {unknown}; expected files {list(UPLOAD_FIELDS)} and optional text fields "
            f"{list(TEXT_FIELDS)}",
            unknown[0],
        )
    prompted = PROMPT_FIELD in fields and not any(name in fields for name in REFERENCE_FIELDS)
    files = {}
    for field_name, name in UPLOAD_FIELDS.items():
        data = fields.get(field_name)
        if data is None and prompted and field_name in REFERENCE_FIELDS:
            continue  # an instruction without a reference
        if data is None:
            alone = ""
            if PROMPT_FIELD in fields:
                alone = " (or neither of the reference pair, beside a 'prompt')"
            elif field_name in REFERENCE_FIELDS and not any(name in fields for name in REFERENCE_FIELDS):
                alone = " (or, for a UniDG-Text bundle, a text field 'prompt' instead of the reference pair)"
            raise ServiceError(
                422,
                "missing_input",
                f"the {name} is missing: send it as file field '{field_name}'{alone}",
                field_name,
            )
        if isinstance(data, str):
            raise ServiceError(
                422,
                "invalid_input",
                f"{field_name} must be an uploaded file (PNG or JPEG), not a text field",
                field_name,
            )
        files[field_name] = data
    return files


def decode_field(data: bytes, field_name: str, max_pixels: int) -> np.ndarray:
    """One upload as an array (images.decode_upload), its errors as ServiceErrors naming the multipart field."""
    name = UPLOAD_FIELDS[field_name]
    try:
        return decode_upload(data, name, max_pixels=max_pixels, as_mask=field_name.endswith("mask"))
    except ImageTooLarge as error:
        raise ServiceError(413, "image_too_large", f"{field_name}: {error}", field_name) from error
    except InputError as error:
        raise ServiceError(422, "invalid_input", f"{field_name}: {error}", field_name) from error


def decode_inputs(files: dict[str, bytes], max_pixels: int) -> SynthesisInputs:
    """The uploads decoded and checked together (sizes match, masks not empty, target mask not full); the reference
    pair is None where it was not sent (beside a prompt)."""
    arrays = {name: decode_field(files[name], name, max_pixels) for name in UPLOAD_FIELDS if name in files}
    inputs = SynthesisInputs(arrays.get("reference"), arrays.get("reference_mask"), arrays["source"], arrays["mask"])
    try:
        validate_request(inputs.reference, inputs.reference_mask, inputs.source, inputs.target_mask)
    except InputError as error:
        field_name = FIELD_OF_INPUT.get(error.name, error.name)
        raise ServiceError(422, "invalid_input", f"{field_name}: {error}", field_name) from error
    return inputs


def release_frames(error: BaseException) -> None:
    """Drop the local variables of the finished frames in an error's traceback (and its causes'): a refused request's
    decoded pictures then go when the request is answered, not when the garbage collector next breaks the reference
    cycles that asyncio futures and exception chains form (~145 MiB per 4 x 16.7 MP request otherwise)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def build_request(inputs: SynthesisInputs, params: SynthesisParams, name: str) -> SynthesisRequest:
    """The runtime request; without a seed the service draws one (and reports it in the metadata)."""
    seed = params.seed if params.seed is not None else DEFAULT_SEED
    return SynthesisRequest(
        reference=inputs.reference,
        reference_mask=inputs.reference_mask,
        source=inputs.source,
        target_mask=inputs.target_mask,
        seed=seed,
        steps=params.steps,
        guidance=params.guidance,
        category=params.category,
        prompt=params.prompt,
        name=name,
    )


def options_check(settings: UniDGSettings) -> Callable[[SynthesisRequest], SynthesisRequest]:
    """The runtime's checks of seed/steps/guidance/category alone (for a synthesizer without ``check``)."""
    return lambda request: check_request_options(request, settings)


def check_options(request: SynthesisRequest, check: Callable[[SynthesisRequest], SynthesisRequest]) -> SynthesisRequest:
    """The runtime's own checks (``check``: DefectSynthesizer.check, or ``options_check``) before the request takes a
    queue place; a refused option answers 422 naming its field."""
    try:
        return check(request)
    except RequestError as error:
        raise request_error(error) from error


def request_error(error: RequestError) -> ServiceError:
    """A runtime RequestError as the service's 422: the prompt or an upload by its field, an option as params.NAME."""
    if error.option == PROMPT_FIELD:
        return ServiceError(422, "invalid_prompt", str(error), PROMPT_FIELD)
    if error.option in UPLOAD_FIELDS:
        return ServiceError(422, "missing_input", str(error), error.option)
    field_name = f"params.{error.option}" if error.option else "params"
    return ServiceError(422, "invalid_params", str(error), field_name)


def input_error(error: InputError) -> ServiceError:
    """A runtime InputError (e.g. a mask too small for the crop) as the service's 422, naming the multipart field."""
    field_name = FIELD_OF_INPUT.get(error.name, error.name)
    return ServiceError(422, "invalid_input", str(error), field_name)


def encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    # compress_level 1: the service is latency-bound; PNG stays lossless either way.
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def jsonable(value: Any) -> Any:
    """Metadata as plain JSON (numpy scalars/arrays, paths and tuples converted)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def public_metadata(metadata: dict) -> dict:
    """The synthesis metadata a client may see: the server's file-system paths are left out."""
    public = jsonable(metadata)
    bundle = public.get("bundle")
    if isinstance(bundle, dict):
        public["bundle"] = {key: value for key, value in bundle.items() if key != "path"}
    return public
