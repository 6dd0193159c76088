"""``unidg demo``: run a bundle on a folder of sample cases and draw a contact sheet.

A samples folder holds ``samples.json``: a list of cases (or {"cases": [...]}), each

    {"id": "scratch-on-wood", "reference": "wood_ref.png", "reference_mask": "wood_ref_mask.png",
     "source": "tile.png", "mask": "tile_mask.png", "category": "scratch", "seed": 0, "object_name": "tile"}

(paths relative to the samples folder; ``id``, ``seed`` and ``object_name`` optional). The shipped UniDG-nano bundle
and its samples live in ``unidg/runtime/assets/``. Outputs: a UDG folder (one quadruplet per case, metadata in
``metadata/<id>.json``) plus ``contact_sheet.png`` (reference | source + target mask | output, one row per case).

``--text`` runs a UniDG-Text bundle (default: the shipped UniDG-nano-text) on the same cases in both of its forms:
with the reference (the bundle's reference instruction) and from an instruction alone ("Add the {category} defect to
the image.", no reference); quadruplets ``<id>`` and ``<id>-instruction``, and a fourth column on the sheet.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from unidg.core import images
from unidg.core.errors import UniDGError
from unidg.core.images import SOURCE_IMAGE, TARGET_MASK, InputError
from unidg.core.instructions import instruction
from unidg.core.manifest import atomic_write_bytes
from unidg.core.staging import staged_folder
from unidg.core.udg import SAMPLE_ID_PATTERN, UDGWriter
from unidg.runtime.jobs import write_result
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest, SynthesisResult

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_BUNDLE = ASSETS / "unidg-nano-bundle"
DEFAULT_TEXT_BUNDLE = ASSETS / "unidg-nano-text-bundle"
DEFAULT_SAMPLES = ASSETS / "samples"
SAMPLES_FILE = "samples.json"
DEMO_MARKER = "demo.json"
CONTACT_SHEET = "contact_sheet.png"
COLUMNS = ("reference (defect outlined)", "source + target outlined", "output")
TEXT_COLUMNS = ("reference (defect outlined)", "source + target outlined", "with the reference", "instruction alone")
INSTRUCTION_SUFFIX = "-instruction"  # the id of a case's no-reference quadruplet


class DemoError(UniDGError):
    """The samples folder or the demo output folder cannot be used."""


@dataclass(frozen=True)
class SampleCase:
    id: str
    reference: Path
    reference_mask: Path
    source: Path
    mask: Path
    category: str | None
    seed: int = 0
    object_name: str = "object"

    def request(self, steps: int | None = None) -> SynthesisRequest:
        try:
            return SynthesisRequest.from_files(
                self.reference,
                self.reference_mask,
                self.source,
                self.mask,
                seed=self.seed,
                steps=steps,
                category=self.category,
                name=f"sample {self.id!r}",
            )
        except InputError as error:
            raise DemoError(f"sample {self.id!r}: {error}") from error

    def instruction_request(self, steps: int | None = None) -> SynthesisRequest:
        """UniDG-Text's form without a reference: the source and region of the case, its category as the
        instruction."""
        if self.category is None:
            raise DemoError(f"sample {self.id!r} has no category; --text builds its instruction from the category")
        try:
            source, target_mask = images.load_image(self.source, SOURCE_IMAGE), images.load_mask(self.mask, TARGET_MASK)
        except InputError as error:
            raise DemoError(f"sample {self.id!r}: {error}") from error
        return SynthesisRequest(
            None,
            None,
            source,
            target_mask,
            seed=self.seed,
            steps=steps,
            category=self.category,
            prompt=instruction({}, self.category, with_reference=False),
            name=f"sample {self.id!r} (instruction)",
        )


def read_samples(folder: str | Path) -> list[SampleCase]:
    folder = Path(folder)
    path = folder / SAMPLES_FILE
    if not path.is_file():
        raise DemoError(f"{folder} has no {SAMPLES_FILE}; a samples folder lists its cases there")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DemoError(f"{path} is not valid JSON ({error})") from error
    entries = data.get("cases") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise DemoError(f"{path} must hold a non-empty list of cases (or {{'cases': [...]}})")
    cases = []
    for number, entry in enumerate(entries):
        where = f"{path} case {number}"
        if not isinstance(entry, dict):
            raise DemoError(f"{where} must be an object")
        missing = [k for k in ("reference", "reference_mask", "source", "mask") if not isinstance(entry.get(k), str)]
        if missing:
            raise DemoError(f"{where} lacks path(s) {missing}")
        case_id = str(entry.get("id", f"sample-{number:03d}"))
        if not SAMPLE_ID_PATTERN.match(case_id):
            raise DemoError(f"{where}: id {case_id!r} must be letters, digits, '.', '_', '-'")
        seed = entry.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DemoError(f"{where}: seed must be a non-negative integer (got {seed!r})")
        cases.append(
            SampleCase(
                id=case_id,
                reference=folder / entry["reference"],
                reference_mask=folder / entry["reference_mask"],
                source=folder / entry["source"],
                mask=folder / entry["mask"],
                category=entry.get("category"),
                seed=seed,
                object_name=str(entry.get("object_name", "object")),
            )
        )
    if len({c.id for c in cases}) != len(cases):
        raise DemoError(f"{path}: case ids must be unique")
    return cases


# ------------------------------------------------------------------------------------------------------ contact sheet
def _fit(image: np.ndarray, cell: int) -> Image.Image:
    """``image`` scaled to fit a cell x cell square, centred on grey."""
    picture = Image.fromarray(image)
    scale = cell / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    picture = picture.resize(size, Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (cell, cell), (64, 64, 64))
    canvas.paste(picture, ((cell - size[0]) // 2, (cell - size[1]) // 2))
    return canvas


def mask_outline(image: np.ndarray, mask: np.ndarray, color=(255, 0, 255), width: int = 2) -> np.ndarray:
    """``image`` with the outline of ``mask`` drawn in ``color`` (the inside stays visible: it is the defect)."""
    inner = mask.copy()
    for _ in range(width):  # 4-neighbour erosion; outside the image counts as outside the mask
        padded = np.pad(inner, 1)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = mask & ~inner
    outlined = image.copy()
    outlined[edge] = color
    return outlined


def contact_sheet(
    rows: list[tuple[str, np.ndarray, ...]], cell: int = 256, columns: tuple[str, ...] = COLUMNS
) -> Image.Image:
    """One row per (label, reference, source with its outline, output(s)); a header names the columns."""
    font = ImageFont.load_default()
    header, label_height, gap = 24, 20, 6
    width = len(columns) * cell + (len(columns) + 1) * gap
    height = header + len(rows) * (cell + label_height + gap) + gap
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(columns):
        draw.text((gap + c * (cell + gap) + 4, 6), title, fill=(0, 0, 0), font=font)
    for r, (label, *cells) in enumerate(rows):
        top = header + r * (cell + label_height + gap)
        draw.text((gap + 4, top + 3), label, fill=(0, 0, 0), font=font)
        for c, image in enumerate(cells):
            sheet.paste(_fit(image, cell), (gap + c * (cell + gap), top + label_height))
    return sheet


# --------------------------------------------------------------------------------------------------------------- run
def run_demo(
    synth: DefectSynthesizer,
    samples: str | Path,
    out: str | Path,
    *,
    steps: int | None = None,
    progress: bool = True,
    text: bool = False,
) -> tuple[Path, list[SynthesisResult]]:
    """Generate every sample case, write them as a UDG folder + contact sheet into ``out``; returns the sheet path.
    ``text``: a UniDG-Text bundle, each case also from its instruction alone (quadruplet ``<id>-instruction``)."""
    out = Path(out)
    if out.exists() and not (out / DEMO_MARKER).is_file():
        raise DemoError(f"--out {out} exists and was not written by `unidg demo`; pick another folder")
    if text and not synth.bundle.text:
        raise DemoError(f"--text needs a UniDG-Text bundle; {synth.bundle.path} is a reference-mode bundle")
    cases = read_samples(samples)
    # Every input is checked before anything runs: per case its reference request, then with --text the other form.
    requests = [
        [synth.check(case.request(steps))] + ([synth.check(case.instruction_request(steps))] if text else [])
        for case in cases
    ]
    with staged_folder(out, replace=True) as staging:  # only a folder a demo wrote is replaced (checked above)
        results = []
        rows = []
        with UDGWriter(staging) as writer:
            for case, forms in tqdm(list(zip(cases, requests)), desc="demo", unit="case", disable=not progress):
                outputs = []
                for request, sample_id in zip(forms, (case.id, f"{case.id}{INSTRUCTION_SUFFIX}")):
                    result = synth.generate(request)
                    metadata_path = f"metadata/{sample_id}.json"
                    write_result(
                        writer, staging, sample_id, request, result, result.metadata, metadata_path, case.object_name
                    )
                    results.append(result)
                    outputs.append(result.image)
                label = f"{case.id}  ({case.category or 'no category'}, seed {case.seed})"
                if text:
                    label += f'  instruction alone: "{forms[1].prompt}"'
                reference = forms[0]
                rows.append(
                    (
                        label,
                        mask_outline(reference.reference, reference.reference_mask, (0, 160, 255)),
                        mask_outline(reference.source, reference.target_mask),
                        *outputs,
                    )
                )
        sheet = contact_sheet(rows, columns=TEXT_COLUMNS if text else COLUMNS)
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        atomic_write_bytes(staging / CONTACT_SHEET, buffer.getvalue())
        marker = {"bundle": str(synth.bundle.path), "fingerprint": synth.bundle.fingerprint, "cases": len(cases)}
        atomic_write_bytes(staging / DEMO_MARKER, (json.dumps(marker, indent=2) + "\n").encode())
    return out / CONTACT_SHEET, results
