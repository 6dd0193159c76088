"""The jobs file of ``unidg batch`` (``unidg.runtime.jobs`` runs it): parsed and checked before any job runs.

Jobs file: UTF-8 (a byte-order mark is allowed), one JSON object per line (blank lines and lines starting with ``#``
are skipped); a UTF-16/32 or binary file is refused naming its encoding:

    {"reference": "refs/a.png", "reference_mask": "refs/a_mask.png", "source": "src/b.png", "mask": "src/b_mask.png",
     "seed": 7, "id": "b-scratch", "category": "scratch", "steps": 28, "guidance": 30.0, "object_name": "bottle"}

``reference``, ``reference_mask``, ``source``, ``mask`` and ``seed`` are required; relative paths resolve against the
jobs file's folder. ``id`` defaults to the line number (``line-000012``). Instead of ``mask`` a job may give
``"mask_template": {"library": "templates", "category": "scratch"}`` (exactly one of the two): the target region is a
template of the mask-template library (runtime.mask_templates; ``category`` defaults to the job's) placed on the
source's foreground with ``np.random.default_rng(seed)``, so a rerun or resume places the same mask. Each library
folder is loaded once per run; the job's metadata names the template id and cluster.

UniDG-Text bundles: ``"prompt"`` is the job's instruction (``"Add the scratch defect to the image."``); beside a prompt
``reference`` and ``reference_mask`` may be left out together (the instruction alone). The prompt is part of the job's
spec: resuming with a changed prompt is refused like any changed input.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unidg.core.errors import UniDGError
from unidg.core.images import (
    REFERENCE_IMAGE,
    REFERENCE_MASK,
    SOURCE_IMAGE,
    TARGET_MASK,
    InputError,
    check_mask_coverage,
    load_image,
    load_mask,
    validate_request,
)
from unidg.core.udg import SAMPLE_ID_PATTERN, check_category
from unidg.runtime.mask_templates import TemplateError, TemplateLibrary, place_template
from unidg.runtime.synthesizer import SynthesisRequest

DEFAULT_CATEGORY = "unknown"  # UDG needs one of the 28 categories; "unknown" is one of them
DEFAULT_OBJECT = "object"
REQUIRED_KEYS = ("reference", "reference_mask", "source", "mask", "seed")
OPTIONAL_KEYS = ("id", "category", "steps", "guidance", "object_name", "prompt")
REFERENCE_KEYS = ("reference", "reference_mask")  # optional together when the job gives a prompt (UniDG-Text)
MASK_TEMPLATE_KEY = "mask_template"  # replaces "mask": {"library": folder, "category": optional, default the job's}
TEMPLATE_KEYS = ("library", "category")


class JobsError(UniDGError):
    """The jobs file, one of its jobs, or the output folder cannot be used; the message names the line or folder."""


@dataclass(frozen=True)
class TemplateSpec:
    """A job's ``mask_template``: the library folder (resolved) and the category whose templates are placed."""

    library: Path
    category: str


# Template libraries of one run, loaded once per folder (resolved path).
Libraries = dict[Path, TemplateLibrary]


@dataclass(frozen=True)
class Job:
    id: str
    line: int
    reference: Path | None  # None with reference_mask: a UniDG-Text job with its prompt alone
    reference_mask: Path | None
    source: Path
    mask: Path | None
    seed: int
    category: str | None = None
    steps: int | None = None
    guidance: float | None = None
    object_name: str = DEFAULT_OBJECT
    mask_template: TemplateSpec | None = None
    prompt: str | None = None

    @property
    def where(self) -> str:
        return f"job {self.id!r} (line {self.line})"

    def spec(self) -> dict:
        """What defines the job's output (recorded in its metadata, compared on resume)."""
        spec = {
            "id": self.id,
            "reference": None if self.reference is None else str(self.reference),
            "reference_mask": None if self.reference_mask is None else str(self.reference_mask),
            "source": str(self.source),
            "mask": None if self.mask is None else str(self.mask),
            "seed": self.seed,
            "category": self.category,
            "steps": self.steps,
            "guidance": self.guidance,
        }
        if self.mask_template is not None:  # only then: specs of mask-file jobs stay as earlier runs recorded them
            spec[MASK_TEMPLATE_KEY] = {
                "library": str(self.mask_template.library),
                "category": self.mask_template.category,
            }
        if self.prompt is not None:  # likewise: only then, and a changed prompt is another job
            spec["prompt"] = self.prompt
        return spec

    def request(self, libraries: Libraries | None = None) -> SynthesisRequest:
        return self.prepare(libraries)[0]

    def prepare(self, libraries: Libraries | None = None) -> tuple[SynthesisRequest, dict | None]:
        """The job's request, and for a ``mask_template`` job the placement record (library, category, template id,
        cluster) for its metadata. ``libraries`` caches template libraries across the jobs of a run."""
        options = {
            "seed": self.seed,
            "steps": self.steps,
            "guidance": self.guidance,
            "category": self.category,
            "prompt": self.prompt,
            "name": self.where,
        }
        try:
            if self.mask_template is None:
                return SynthesisRequest.from_files(
                    self.reference, self.reference_mask, self.source, self.mask, **options
                ), None
            reference = None if self.reference is None else load_image(self.reference, REFERENCE_IMAGE)
            reference_mask = None if self.reference_mask is None else load_mask(self.reference_mask, REFERENCE_MASK)
            source = load_image(self.source, SOURCE_IMAGE)
            target_mask, placement = self._place(source, {} if libraries is None else libraries)
            check_mask_coverage(target_mask, TARGET_MASK, allow_full=False)
            validate_request(reference, reference_mask, source, target_mask)
        except InputError as error:
            raise JobsError(f"{self.where}: {error}") from error
        return SynthesisRequest(reference, reference_mask, source, target_mask, **options), placement

    def _place(self, source: np.ndarray, libraries: Libraries) -> tuple[np.ndarray, dict]:
        spec = self.mask_template
        assert spec is not None
        key = spec.library.resolve()
        if key not in libraries:
            if not spec.library.is_dir():
                raise JobsError(
                    f"{self.where}: 'mask_template' library {spec.library} is not a folder; give the folder "
                    "`unidg data templates` wrote"
                )
            try:
                libraries[key] = TemplateLibrary.load(spec.library)
            except TemplateError as error:
                raise JobsError(
                    f"{self.where}: 'mask_template' library {spec.library} is not a usable mask-template library "
                    f"({error.__cause__ or error}); build it with `unidg data templates`"
                ) from error
        library = libraries[key]
        if spec.category not in library.clusters:
            raise JobsError(
                f"{self.where}: 'mask_template' category {spec.category!r} has no templates in {spec.library} "
                f"(it has: {', '.join(library.categories)}); pick one of those or rebuild the library with "
                f"{spec.category!r} masks"
            )
        try:
            mask, template = place_template(library, spec.category, source, np.random.default_rng(self.seed))
        except TemplateError as error:
            raise JobsError(f"{self.where}: 'mask_template': {error}") from error
        placement = {
            "library": str(spec.library),
            "category": spec.category,
            "template": template.id,
            "cluster": template.cluster,
        }
        return mask, placement


def _parse_job(folder: Path, number: int, text: str) -> Job:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise JobsError(f"line {number} is not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(data, dict):
        raise JobsError(f"line {number} must be a JSON object, got {type(data).__name__}")
    if "mask" in data and MASK_TEMPLATE_KEY in data:
        raise JobsError(
            f"line {number} has both 'mask' and {MASK_TEMPLATE_KEY!r}; give exactly one: a mask file, or a template "
            "library to place a mask from"
        )
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise JobsError(
            f"line {number}: 'prompt' must be a string, the instruction such as \"Add the scratch defect to the "
            f'image." (got {prompt!r})'
        )
    optional = REFERENCE_KEYS if prompt is not None else ()
    missing = [
        key
        for key in REQUIRED_KEYS
        if key not in data and key not in optional and not (key == "mask" and MASK_TEMPLATE_KEY in data)
    ]
    if missing:
        raise JobsError(
            f"line {number} lacks {missing} (each job needs {list(REQUIRED_KEYS)}, with "
            f'"{MASK_TEMPLATE_KEY}": {{"library": ..., "category": ...}} allowed instead of "mask", and the '
            'reference pair optional with a "prompt" for a UniDG-Text bundle)'
        )
    given = [key for key in REFERENCE_KEYS if key in data]
    if len(given) == 1:
        (other,) = set(REFERENCE_KEYS) - set(given)
        raise JobsError(f"line {number} gives {given[0]!r} without {other!r}; give both, or neither (the prompt alone)")
    known = REQUIRED_KEYS + OPTIONAL_KEYS + (MASK_TEMPLATE_KEY,)
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise JobsError(f"line {number} has unknown keys {unknown} (known: {list(known)})")
    paths = {}
    for key in ("reference", "reference_mask", "source", "mask"):
        if key not in data:
            paths[key] = None
            continue
        value = data[key]
        if not isinstance(value, str) or not value:
            raise JobsError(f"line {number}: {key!r} must be a non-empty path string (got {value!r})")
        path = Path(value).expanduser()
        paths[key] = path if path.is_absolute() else folder / path
    seed = data["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise JobsError(f"line {number}: 'seed' must be a non-negative integer (got {seed!r})")
    job_id = data.get("id", f"line-{number:06d}")
    if not isinstance(job_id, str) or not SAMPLE_ID_PATTERN.match(job_id):
        raise JobsError(f"line {number}: 'id' must be letters, digits, '.', '_', '-' (got {job_id!r})")
    category = data.get("category")
    if category is not None:
        try:
            check_category(category)
        except ValueError as error:
            raise JobsError(f"line {number}: {error}") from None
    object_name = data.get("object_name", DEFAULT_OBJECT)
    if not isinstance(object_name, str) or not object_name.strip():
        raise JobsError(f"line {number}: 'object_name' must be a non-empty string (got {object_name!r})")
    mask_template = None
    if MASK_TEMPLATE_KEY in data:
        mask_template = _parse_template_spec(folder, number, data[MASK_TEMPLATE_KEY], category)
    return Job(
        id=job_id,
        line=number,
        seed=seed,
        category=category,
        steps=data.get("steps"),
        guidance=data.get("guidance"),
        object_name=object_name,
        mask_template=mask_template,
        prompt=prompt,
        **paths,
    )


def _parse_template_spec(folder: Path, number: int, value: object, job_category: str | None) -> TemplateSpec:
    example = '{"library": "templates", "category": "scratch"}'
    if not isinstance(value, dict):
        raise JobsError(f"line {number}: {MASK_TEMPLATE_KEY!r} must be an object like {example} (got {value!r})")
    unknown = sorted(set(value) - set(TEMPLATE_KEYS))
    if unknown:
        raise JobsError(
            f"line {number}: {MASK_TEMPLATE_KEY!r} has unknown keys {unknown} (known: {list(TEMPLATE_KEYS)})"
        )
    library = value.get("library")
    if not isinstance(library, str) or not library:
        raise JobsError(
            f"line {number}: {MASK_TEMPLATE_KEY!r} needs 'library', the folder `unidg data templates` wrote "
            f"(got {library!r})"
        )
    category = value.get("category", job_category)
    if category is None:
        raise JobsError(
            f"line {number}: {MASK_TEMPLATE_KEY!r} needs a 'category' (in it or the job's 'category') to pick "
            "templates from"
        )
    try:
        check_category(category)
    except ValueError as error:
        raise JobsError(f"line {number}: {MASK_TEMPLATE_KEY!r}: {error}") from None
    path = Path(library).expanduser()
    return TemplateSpec(library=path if path.is_absolute() else folder / path, category=category)


BYTE_ORDER_MARKS = (  # UTF-32 first: its little-endian mark starts with UTF-16's
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def jobs_lines(path: Path, data: bytes) -> list[str]:
    """The lines of a jobs file as text: UTF-8 (a leading byte-order mark dropped); other encodings named."""
    for mark, encoding in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            raise JobsError(
                f"jobs file {path} is {encoding} (it starts with a {encoding} byte-order mark); save it as UTF-8"
            )
    if b"\x00" in data:
        raise JobsError(
            f"jobs file {path} holds NUL bytes: it is binary, or UTF-16/32 without a byte-order mark; a jobs file is "
            "UTF-8 text with one JSON object per line"
        )
    data = data.removeprefix(codecs.BOM_UTF8)
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise JobsError(
                f"jobs file {path}: line {number} is not UTF-8 (byte 0x{raw[error.start]:02x} at byte "
                f"{error.start + 1} of the line); save the file as UTF-8"
            ) from None
    return lines


def read_jobs(path: str | Path) -> list[Job]:
    """Parse and check a jobs file (syntax, keys, ids); image files are checked by ``run_batch`` before it runs."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise JobsError(f"jobs file {path} is not a file; pass a JSON-lines file with one job per line")
    if not path.is_file():
        raise JobsError(f"jobs file {path} not found; pass a JSON-lines file with one job per line")
    jobs: list[Job] = []
    lines: dict[str, int] = {}
    for number, text in enumerate(jobs_lines(path, path.read_bytes()), start=1):
        if not text.strip() or text.lstrip().startswith("#"):
            continue
        try:
            job = _parse_job(path.parent, number, text)
        except JobsError as error:
            raise JobsError(f"{path}: {error}") from None
        if job.id in lines:
            raise JobsError(f"{path}: line {number} repeats id {job.id!r} of line {lines[job.id]}; ids must be unique")
        lines[job.id] = number
        jobs.append(job)
    if not jobs:
        raise JobsError(f"jobs file {path} lists no jobs")
    return jobs
