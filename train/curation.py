"""``unidg data curate``: a factory's own defect photos -> UDG quadruplets, by the paper's agents (App. A.1).

For every abnormal image with its defect mask (a plain folder, MVTec-AD or VisA):
1. **Inpainting Agent** — the normal counterpart: the defect region removed. ``bundle`` runs a UniDG bundle (the
   user's weights) with a defect-free patch of the same image as the reference: the box of the defect's size nearest
   to it that stays clear of the dilated defect, so the model paints that surface over the defect (our bundles are
   reference-based; the paper's agent is a FLUX.1-Fill fine-tuned to remove defects, which is not built here).
   ``biharmonic`` (scikit-image's ``inpaint_biharmonic`` over the dilated mask) needs no model: good on smooth
   surfaces, visibly blurred on textured ones.
2. **Captioner Agent** — each model of ``[captioner].models`` (one OpenAI-compatible server, e.g. a router in front of
   several MLLMs) describes the triplet with the Fig. 7 prompt; answers that break the caption schema are retried,
   candidates with confidence below ``min_confidence`` (0.8) are dropped.
3. **Verifier Agent** — the Fig. 8 rubric on each remaining candidate, highest confidence first; a candidate whose mean
   score is below ``min_verifier_score`` (4.2) is inaccurate. The first accurate one is kept; none: the item is dropped.

Nothing is dropped silently: ``curation.jsonl`` in the output records every decision with its reason and the figures
behind it. The run is resumable: an item with a decision is never asked again, a kill leaves at most the item in
flight undecided (its quadruplet line is written before its decision, and a quadruplet already in the index is not
written twice). Agent answers are cached on disk (``cache_dir``), so a resumed run sends nothing twice. An item whose
agents could not answer (server down after retries) is recorded as ``error`` and asked again on the next run.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from pydantic import Field, ValidationError, field_validator
from tqdm import tqdm

from unidg.core.errors import UniDGError
from unidg.core.geometry import dilate_mask, mask_bbox
from unidg.core.images import load_image, load_mask
from unidg.core.manifest import atomic_write_text
from unidg.core.udg import CATEGORIES, INDEX_FILE, UDGWriter, caption_problems
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest
from unidg.train.chat_client import ChatClient, connection_problems, parse_json_answer, png_data_url
from unidg.train.config import ConfigError, load_config
from unidg.train.evaluation.datasets import read_visa_rows
from unidg.train.judge import Score, ScoredAnswer

PROMPTS = Path(__file__).parent / "prompts"
LOG_FILE = "curation.jsonl"
VERIFIER_DIMENSIONS = ("Consistency", "Defect Existence", "Normality")
INPAINTERS = ("biharmonic", "bundle")
FORMATS = ("folder", "mvtec", "visa")
# Original defect names of MVTec-AD / VisA and common factory words -> the 28 UDG categories (exact names map to
# themselves; anything else is "unknown" and says so in the log).
CATEGORY_OF = {
    "crack": "breakage",
    "broken": "breakage",
    "broken_large": "breakage",
    "broken_small": "breakage",
    "cut": "breakage",
    "contamination": "foreign matter",
    "color": "discoloration",
    "stain": "dirt",
    "oil": "dirt",
    "poke": "hole",
    "squeeze": "deformation",
    "bent": "deformation",
    "bent_wire": "deformation",
    "bent_lead": "deformation",
    "faulty_imprint": "misprint",
    "print": "misprint",
    "missing_cable": "missing",
    "missing_wire": "missing",
    "missing_screw": "missing",
    "fabric_border": "deformation",
    "glue_strip": "glue",
    "metal_contamination": "foreign matter",
    "thread": "foreign matter",
    "rough": "abrasion",
    "manipulated_front": "deformation",
    "scratch_head": "scratch",
    "scratch_neck": "scratch",
    "split_teeth": "breakage",
    "damaged_case": "breakage",
    "cable_swap": "combined",
    "pill_type": "combined",
    "misplaced": "combined",
    "flip": "combined",
    "fold": "fold",
    "gray_stroke": "dirt",
    "liquid": "dirt",
    "pushpin": "foreign matter",
    "chip": "breakage",
    "burnt": "discoloration",
    "spot": "black spot",
    "bubble": "bubble",
}


class CurationError(UniDGError):
    """A curation input, config or agent that cannot be used."""


def udg_category(defect_type: str) -> str:
    name = defect_type.strip().lower()
    spaced = name.replace("_", " ")
    if spaced in CATEGORIES:
        return spaced
    return CATEGORY_OF.get(name.replace(" ", "_"), "unknown")


# ---------------------------------------------------------------------------------------------------- configuration
@dataclass
class AgentConfig:
    url: str = ""  # base URL of an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1
    model: str = ""  # verifier: the model; captioner: the first of `models` when `models` is empty
    models: list[str] = field(default_factory=list)  # captioner: every model asked for a candidate caption
    api_key_env: str = "UNIDG_CURATE_API_KEY"
    timeout_s: float = 120.0
    max_response_bytes: int = 1 << 20
    retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    concurrency: int = 1
    cache_dir: str = ""
    max_tokens: int = 2048
    temperature: float = 0.0


@dataclass
class CurateConfig:
    input: str = ""  # folder of abnormal images and masks (see `format`)
    format: str = "folder"  # folder | mvtec | visa
    output: str = ""  # UDG folder to write (resumable)
    inpainter: str = "biharmonic"  # biharmonic | bundle
    inpaint_bundle: str = ""  # inpainter "bundle": the bundle folder that paints the defect-free patch
    min_confidence: float = 0.8  # captions below it are dropped before verification (paper: 0.8)
    min_verifier_score: float = 4.2  # mean verifier score of an accurate caption (paper: 4.2)
    limit: int = 0  # the first N items only (0: all)
    captioner: AgentConfig = field(default_factory=AgentConfig)
    verifier: AgentConfig = field(default_factory=AgentConfig)

    def validate(self, where: str) -> None:
        problems = connection_problems(self.verifier, "verifier")
        captioner = self.captioner
        if not captioner.models and captioner.model:
            captioner.models = [captioner.model]
        for model in captioner.models:
            problems += connection_problems(replace(captioner, model=model), "captioner")
        if not captioner.models:
            problems.append("captioner.models must name at least one model")
        if self.format not in FORMATS:
            problems.append(f"format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if self.inpainter not in INPAINTERS:
            problems.append(f"inpainter must be one of {', '.join(INPAINTERS)} (got {self.inpainter!r})")
        if self.inpainter == "bundle" and not self.inpaint_bundle:
            problems.append('inpainter "bundle" needs inpaint_bundle = a bundle folder (unidg export onnx)')
        if not 0 <= self.min_confidence <= 1 or not 0 <= self.min_verifier_score <= 5 or self.limit < 0:
            problems.append("min_confidence must be in [0, 1], min_verifier_score in [0, 5] and limit >= 0")
        if problems:
            raise ConfigError(f"{where}: {problems[0]}")


def load_curate_config(path: str | Path, overrides: list[str] | None = None) -> CurateConfig:
    return load_config(path, CurateConfig, overrides)


# ------------------------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class CurationItem:
    id: str  # becomes the quadruplet id
    image: Path
    mask: Path
    defect_type: str
    object_name: str


def _item_id(*parts: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(parts)).strip("-.") or "item"


def read_items(folder: str | Path, layout: str) -> list[CurationItem]:
    """Abnormal images with their masks. ``folder``: FOLDER/images/NAME.* + FOLDER/masks/NAME.png, with an optional
    FOLDER/defects.csv (name,defect_type,object_name); ``mvtec``: OBJECT/test/DEFECT/N.png +
    OBJECT/ground_truth/DEFECT/N_mask.png; ``visa``: split_csv/1cls.csv rows labelled anomaly."""
    root = Path(folder)
    if not root.is_dir():
        raise CurationError(f"--in {root} is not a folder")
    items: list[CurationItem] = []
    if layout == "folder":
        details = {}
        if (root / "defects.csv").is_file():
            with open(root / "defects.csv", newline="", encoding="utf-8") as handle:
                details = {row["name"]: row for row in csv.DictReader(handle)}
        for image in sorted(p for p in (root / "images").glob("*") if p.is_file()):
            row = details.get(image.stem, {})
            items.append(
                CurationItem(
                    _item_id(image.stem),
                    image,
                    root / "masks" / f"{image.stem}.png",
                    row.get("defect_type", "unknown"),
                    row.get("object_name", root.name),
                )
            )
    elif layout == "mvtec":
        for image in sorted(root.glob("*/test/*/*.png")):
            defect, name = image.parent.name, image.stem
            if defect == "good":
                continue
            obj = image.parents[2].name
            mask = root / obj / "ground_truth" / defect / f"{name}_mask.png"
            items.append(CurationItem(_item_id(obj, defect, name), image, mask, defect, obj.replace("_", " ")))
    else:
        table = root / "split_csv" / "1cls.csv"
        if not table.is_file():
            raise CurationError(f"--in {root}: no split_csv/1cls.csv; is this the VisA root folder?")
        for row in read_visa_rows(table, CurationError):
            if row.get("label") != "anomaly" or not row.get("mask"):
                continue
            image = root / row["image"]
            items.append(
                CurationItem(_item_id(row["object"], image.stem), image, root / row["mask"], "unknown", row["object"])
            )
    if not items:
        raise CurationError(f"--in {root} holds no abnormal images in the {layout} layout; see `unidg data curate -h`")
    return items


# ------------------------------------------------------------------------------------------------------------ agents
def inpaint_biharmonic(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The normal counterpart: the dilated defect region filled by biharmonic inpainting (scikit-image), computed on a
    crop around it; every pixel outside the dilated mask is the input's."""
    from skimage.restoration import inpaint_biharmonic

    region = dilate_mask(mask, 7, 2)
    top, bottom, left, right = mask_bbox(region)
    margin = 16
    top, left = max(top - margin, 0), max(left - margin, 0)
    bottom, right = min(bottom + margin, image.shape[0]), min(right + margin, image.shape[1])
    crop = image[top:bottom, left:right].astype(np.float64) / 255.0
    filled = inpaint_biharmonic(crop, region[top:bottom, left:right], channel_axis=-1)
    out = image.copy()
    patch = np.clip(np.rint(filled * 255.0), 0, 255).astype(np.uint8)
    out[top:bottom, left:right][region[top:bottom, left:right]] = patch[region[top:bottom, left:right]]
    return out


def clean_reference_box(mask: np.ndarray) -> np.ndarray | None:
    """A bool box of the dilated defect's bounding-box size that does not touch the dilated defect, nearest to it
    (the eight neighbouring positions first, then a scan), or None when the image has no such place."""
    region = dilate_mask(mask, 7, 2)
    top, bottom, left, right = mask_bbox(region)
    height, width = bottom - top, right - left
    rows, columns = mask.shape
    candidates = [(top + dy * height, left + dx * width) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    step_y, step_x = max(height // 2, 1), max(width // 2, 1)
    scan = [(y, x) for y in range(0, rows - height + 1, step_y) for x in range(0, columns - width + 1, step_x)]
    scan.sort(key=lambda corner: (corner[0] - top) ** 2 + (corner[1] - left) ** 2)
    for y, x in candidates + scan:
        if 0 <= y <= rows - height and 0 <= x <= columns - width and not region[y : y + height, x : x + width].any():
            box = np.zeros_like(mask)
            box[y : y + height, x : x + width] = True
            return box
    return None


class BundleInpainter:
    """The ``bundle`` Inpainting Agent: a UniDG bundle paints a defect-free patch of the image over its defect."""

    def __init__(self, bundle: str | Path, seed: int = 0) -> None:
        self.synth = DefectSynthesizer.from_bundle(bundle)
        self.seed = seed

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        box = clean_reference_box(mask)
        if box is None:
            raise CurationError("no defect-free area of the defect's size for the bundle inpainter")
        request = SynthesisRequest(image, box, image, mask, seed=self.seed, name="inpainting")
        return self.synth.generate(request).image

    def close(self) -> None:
        self.synth.close()


class VerifierAnswer(ScoredAnswer):
    """The Fig. 8 answer."""

    consistency: Score = Field(alias="Consistency")
    defect_existence: Score = Field(alias="Defect Existence")
    normality: Score = Field(alias="Normality")

    @field_validator("consistency", "defect_existence", "normality", mode="before")
    @classmethod
    def _unwrap(cls, value: object) -> object:
        if isinstance(value, list) and len(value) == 1:  # Fig. 8 writes "[4.5]"
            return value[0]
        return value

    @property
    def mean(self) -> float:
        return (self.consistency + self.defect_existence + self.normality) / 3


def parse_caption(content: str) -> tuple[dict, float]:
    """(caption, confidence) of a captioner answer; ValueError when it breaks the Fig. 7 schema."""
    caption = parse_json_answer(content)
    problems = caption_problems(caption)
    if problems:
        raise ValueError(f"caption schema: {problems[0]}")
    confidence = caption.get("Confidence")
    if isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 <= confidence <= 1:
        raise ValueError(f"caption needs a Confidence in [0, 1] (got {confidence!r})")
    return caption, float(confidence)


def parse_verdict(content: str) -> VerifierAnswer:
    try:
        return VerifierAnswer.model_validate(parse_json_answer(content))
    except ValidationError as error:
        raise ValueError(f"verifier schema: {error.errors()[0]['msg']}") from error


def _body(agent: AgentConfig, model: str, prompt: str, parts: list[tuple[str, object]]) -> dict:
    content: list[dict] = []
    for label, value in parts:
        content.append({"type": "text", "text": label})
        if isinstance(value, np.ndarray):
            content.append({"type": "image_url", "image_url": {"url": png_data_url(value)}})
        else:
            content.append({"type": "text", "text": str(value)})
    return {
        "model": model,
        "messages": [{"role": "system", "content": prompt}, {"role": "user", "content": content}],
        "max_tokens": agent.max_tokens,
        "temperature": agent.temperature,
    }


# ------------------------------------------------------------------------------------------------------------ the run
def _decided(out: Path) -> dict[str, dict]:
    """The last decision per item of an earlier run. A last line torn by a kill is cut off (that item is decided
    again), so the next decision starts on a line of its own."""
    decisions = {}
    log = out / LOG_FILE
    if log.is_file():
        data = log.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(log, "r+b") as handle:
                handle.truncate(data.rfind(b"\n") + 1)
        for line in log.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                decisions[entry["item"]] = entry
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return decisions


def _indexed_ids(out: Path) -> set[str]:
    """Ids already in the output's index (a torn last line is the writer's to repair)."""
    ids = set()
    index = out / INDEX_FILE
    if index.is_file():
        for line in index.read_bytes().decode("utf-8", errors="replace").splitlines():
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return ids


def _append_log(out: Path, entry: dict) -> None:
    with open(out / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()


def curate(config: CurateConfig, *, progress: bool = True) -> dict[str, int]:
    """Run the three agents over ``config.input`` into ``config.output``; returns counts per decision and reason."""
    items = read_items(config.input, config.format)[: config.limit or None]
    out = Path(config.output)
    if out.exists() and not out.is_dir():
        raise CurationError(f"output {out} is a file; name a folder")
    out.mkdir(parents=True, exist_ok=True)
    decided = {k: v for k, v in _decided(out).items() if v["decision"] != "error"}
    existing = _indexed_ids(out)
    captioner = config.captioner
    captioners = [
        ChatClient(replace(captioner, model=model), role=f"captioner[{model}]", error=CurationError)
        for model in captioner.models
    ]
    verifier = ChatClient(config.verifier, role="verifier", error=CurationError)
    inpainter = BundleInpainter(config.inpaint_bundle) if config.inpainter == "bundle" else inpaint_biharmonic
    caption_prompt = (PROMPTS / "captioner.md").read_text(encoding="utf-8")
    verify_prompt = (PROMPTS / "verifier.md").read_text(encoding="utf-8")
    counts: dict[str, int] = {}
    try:
        with UDGWriter(out) as writer:
            for item in tqdm(items, desc="curate", unit="image", disable=not progress):
                if item.id in decided:
                    continue
                agents = (captioners, verifier, caption_prompt, verify_prompt, inpainter)
                entry = _curate_item(item, config, agents, writer, existing)
                _append_log(out, entry)
                key = entry["decision"] + (f": {entry['reason']}" if entry["decision"] != "kept" else "")
                counts[key] = counts.get(key, 0) + 1
    finally:
        if isinstance(inpainter, BundleInpainter):
            inpainter.close()
        for client in [*captioners, verifier]:
            client.close()
    (out / INDEX_FILE).touch()  # a run that kept nothing still leaves a (empty) UDG folder
    atomic_write_text(out / "curation-summary.json", json.dumps(_summary(out), indent=2) + "\n")
    return counts


def _summary(out: Path) -> dict:
    summary: dict[str, int] = {}
    for entry in _decided(out).values():
        key = entry["decision"] + (f": {entry['reason']}" if entry["decision"] != "kept" else "")
        summary[key] = summary.get(key, 0) + 1
    return summary


def _curate_item(item: CurationItem, config: CurateConfig, agents: tuple, writer: UDGWriter, existing: set) -> dict:
    captioners, verifier, caption_prompt, verify_prompt, inpainter = agents
    entry: dict = {"item": item.id, "image": str(item.image), "defect_type": item.defect_type}
    try:
        abnormal = load_image(item.image, "abnormal image")
        mask = load_mask(item.mask, "defect mask")
        if mask.shape != abnormal.shape[:2]:
            raise CurationError(f"defect mask {item.mask} is {mask.shape[::-1]}, the image {abnormal.shape[1::-1]}")
    except UniDGError as error:
        return {**entry, "decision": "rejected", "reason": "unreadable input", "detail": str(error)}
    try:
        normal = inpainter(abnormal, mask)
    except CurationError as error:
        return {
            **entry,
            "decision": "rejected",
            "reason": "the inpainter found no defect-free area",
            "detail": str(error),
        }
    candidates, notes = [], []
    for client in captioners:
        body = _body(
            config.captioner,
            client.settings.model,
            caption_prompt,
            [("Defect Image:", abnormal), ("Defect Mask:", mask), ("Normal Image:", normal)],
        )
        try:
            caption, confidence = client.ask(body, parse_caption, item.id)
        except CurationError as error:
            notes.append(str(error))
            continue
        candidates.append({"model": client.settings.model, "confidence": confidence, "caption": caption})
    entry["captions"] = [{"model": c["model"], "confidence": c["confidence"]} for c in candidates]
    if not candidates:
        return {**entry, "decision": "error", "reason": "no captioner answered", "detail": notes}
    confident = sorted(
        (c for c in candidates if c["confidence"] >= config.min_confidence), key=lambda c: -c["confidence"]
    )
    if not confident:
        return {**entry, "decision": "rejected", "reason": f"no caption with confidence >= {config.min_confidence}"}
    verdicts = []
    for candidate in confident:
        description = json.dumps(candidate["caption"], ensure_ascii=False)
        body = _body(
            config.verifier,
            config.verifier.model,
            verify_prompt,
            [("Normal Image:", normal), ("Defect Image:", abnormal), ("Defect Mask:", mask)]
            + [("Detailed Descriptions:", description)],
        )
        try:
            verdict = verifier.ask(body, parse_verdict, item.id)
        except CurationError as error:
            return {**entry, "decision": "error", "reason": "the verifier did not answer", "detail": str(error)}
        verdicts.append({"model": candidate["model"], "mean": round(verdict.mean, 4)})
        if verdict.mean >= config.min_verifier_score:
            entry["verdicts"] = verdicts
            caption = {k: v for k, v in candidate["caption"].items() if k != "Confidence"}
            caption["Confidence"] = candidate["confidence"]
            category = udg_category(item.defect_type)
            if item.id not in existing:
                writer.add(
                    normal,
                    abnormal,
                    mask,
                    category=category,
                    object_name=item.object_name,
                    caption=caption,
                    sample_id=item.id,
                )
                existing.add(item.id)
            return {**entry, "decision": "kept", "model": candidate["model"], "category": category}
    entry["verdicts"] = verdicts
    return {**entry, "decision": "rejected", "reason": f"every caption scored below {config.min_verifier_score}"}
