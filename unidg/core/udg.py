"""UDG quadruplets: normal image, abnormal image, defect mask and structured caption (paper Sec. 3.2, App. A).

A UDG folder holds the images (any layout below the folder) and ``index.jsonl``: one quadruplet per line, as JSON:

    {"id": "000001", "normal": "normal/000001.png", "abnormal": "abnormal/000001.png", "mask": "mask/000001.png",
     "object_name": "brick wall", "category": "scratch", "caption": {...Fig. 7 schema...},
     "height": 256, "width": 256}

Paths are relative to the folder, POSIX style, and may not leave it. ``category`` is one of the paper's 28 standardized
categories (``CATEGORIES``); the caption's free-form ``defect-level[i].type`` keeps the original defect name. Masks are
L-mode PNGs, 0/255 (a pixel is defect when its value is > 127). ``height``/``width`` are optional and checked when set.

This module is part of the lean runtime (numpy, Pillow, stdlib): the runtime writes its own outputs as quadruplets.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from unidg.core import images
from unidg.core.errors import UniDGError
from unidg.core.manifest import atomic_write_bytes

INDEX_FILE = "index.jsonl"

# The 28 standardized defect categories of the UDG dataset, in the paper's order (descending frequency, App. A.2).
CATEGORIES: tuple[str, ...] = (
    "missing",
    "combined",
    "deformation",
    "discoloration",
    "breakage",
    "dirt",
    "scratch",
    "dehiscence",
    "bruise",
    "raised",
    "foreign matter",
    "abrasion",
    "indentation",
    "unknown",
    "hole",
    "black spot",
    "fold",
    "misprint",
    "wrinkle",
    "graze",
    "watermark",
    "scraped",
    "glue",
    "knife grain",
    "rust",
    "bubble",
    "unclear",
    "bright line",
)

# Caption schema of the Captioner Agent (paper Fig. 7): top-level keys and the fields of each list entry.
IMAGE_LEVEL_FIELDS: tuple[str, ...] = ("foreground-object", "background")
OBJECT_LEVEL_FIELDS: tuple[str, ...] = ("viewpoint", "material", "texture", "structure", "color", "shape", "summary")
DEFECT_LEVEL_FIELDS: tuple[str, ...] = (
    "type",
    "shape",
    "direction",
    "contrast",
    "color",
    "material",
    "size",
    "width",
    "depth",
    "edge",
    "severity",
    "location",
    "summary",
)
CAPTION_LISTS: dict[str, tuple[str, ...]] = {
    "image-level": IMAGE_LEVEL_FIELDS,
    "foreground-object-level": OBJECT_LEVEL_FIELDS,
    "defect-level": DEFECT_LEVEL_FIELDS,
}
CONFIDENCE_KEY = "Confidence"

_REQUIRED_KEYS = ("id", "normal", "abnormal", "mask", "object_name", "category", "caption")
_KNOWN_KEYS = frozenset(_REQUIRED_KEYS) | {"height", "width"}
# Sample ids name files: letters, digits, ".", "_" and "-", starting with a letter or digit.
SAMPLE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UDGError(UniDGError):
    """A UDG folder, index line, quadruplet or caption is malformed; the message names the input and the fix."""


class CaptionError(UDGError):
    """A caption does not follow the Fig. 7 schema."""


# ----------------------------------------------------------------------------------------------------------- captions
def caption_problems(caption: object) -> list[str]:
    """Every way ``caption`` departs from the Fig. 7 schema (empty list: valid).

    Each of "image-level", "foreground-object-level", "defect-level" is a list of objects carrying all the schema's
    fields as strings ("defect-level" needs at least one entry); "summary" is a string. "Confidence" is optional (the
    published UDG captions of Fig. 9 omit it) and, when present, a number in [0, 1]. Extra keys are allowed.
    """
    if not isinstance(caption, dict):
        return [f"caption must be a JSON object, got {type(caption).__name__}"]
    problems = []
    for key, entry_fields in CAPTION_LISTS.items():
        entries = caption.get(key)
        if not isinstance(entries, list):
            problems.append(f'caption["{key}"] must be a list of objects (got {type(entries).__name__})')
            continue
        if key == "defect-level" and not entries:
            problems.append('caption["defect-level"] must describe at least one defect')
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                problems.append(f'caption["{key}"][{i}] must be an object')
                continue
            missing = [name for name in entry_fields if name not in entry]
            if missing:
                problems.append(f'caption["{key}"][{i}] is missing {", ".join(repr(m) for m in missing)}')
            wrong = [name for name in entry_fields if name in entry and not isinstance(entry[name], str)]
            if wrong:
                problems.append(f'caption["{key}"][{i}] fields {", ".join(wrong)} must be strings')
    if not isinstance(caption.get("summary"), str):
        problems.append('caption["summary"] must be a string')
    if CONFIDENCE_KEY in caption:
        value = caption[CONFIDENCE_KEY]
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
            problems.append(f'caption["{CONFIDENCE_KEY}"] must be a number in [0, 1] (got {value!r})')
    return problems


def validate_caption(caption: object, name: str = "caption") -> None:
    """Raise ``CaptionError`` listing every schema problem of ``caption``."""
    problems = caption_problems(caption)
    if problems:
        raise CaptionError(f"{name} does not follow the UDG caption schema (paper Fig. 7): {'; '.join(problems)}")


def mask_location(mask: np.ndarray) -> str:
    """Where the mask's centroid lies on a 3x3 grid: "top-left", "top", ..., "center", ..., "bottom-right"."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return "none"
    height, width = mask.shape
    row = ("top", "", "bottom")[min(int(3 * ys.mean() / height), 2)]
    col = ("left", "", "right")[min(int(3 * xs.mean() / width), 2)]
    return "-".join(part for part in (row, col) if part) or "center"


def mask_size_word(mask: np.ndarray) -> str:
    """Defect size from its area ratio: small (< 1.5 %), medium (< 5 %) or large."""
    ratio = float(np.count_nonzero(mask)) / mask.size
    return "small" if ratio < 0.015 else "medium" if ratio < 0.05 else "large"


def caption_stub(category: str, object_name: str, mask: np.ndarray | None = None) -> dict:
    """A schema-valid caption carrying only what is known without analysis: object, category, and (with a mask) the
    defect's size and location. Unknown fields read "unknown"; no "Confidence", since nobody assessed the image."""
    check_category(category)
    size = mask_size_word(mask) if mask is not None else "unknown"
    location = mask_location(mask) if mask is not None else "unknown"
    defect = dict.fromkeys(DEFECT_LEVEL_FIELDS, "unknown")
    defect.update(type=category, size=size, location=location)
    where = f" at the {location}" if location != "unknown" else ""
    defect["summary"] = f"A {size + ' ' if size != 'unknown' else ''}{category} defect{where} of the {object_name}."
    obj = dict.fromkeys(OBJECT_LEVEL_FIELDS, "unknown")
    obj["summary"] = f"A {object_name}."
    return {
        "image-level": [{"foreground-object": object_name, "background": "unknown"}],
        "foreground-object-level": [obj],
        "defect-level": [defect],
        "summary": f"A {object_name} with a {category} defect{where}.",
    }


def check_category(category: str) -> str:
    if category not in CATEGORIES:
        raise UDGError(
            f"unknown defect category {category!r}; use one of the 28 standardized categories: {', '.join(CATEGORIES)}"
        )
    return category


# -------------------------------------------------------------------------------------------------------- quadruplets
@dataclass(frozen=True)
class Quadruplet:
    """One normal-abnormal-mask-caption sample. Paths are relative to ``root``, the UDG folder."""

    id: str
    normal: str
    abnormal: str
    mask: str
    caption: dict = field(repr=False)
    object_name: str
    category: str
    root: Path | None = field(default=None, compare=False, repr=False)
    size: tuple[int, int] | None = field(default=None, compare=False)  # (height, width) when known
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # unknown index keys, kept on rewrite

    def path(self, which: str) -> Path:
        """Absolute path of "normal", "abnormal" or "mask"."""
        if which not in ("normal", "abnormal", "mask"):
            raise ValueError(f"which must be 'normal', 'abnormal' or 'mask' (got {which!r})")
        if self.root is None:
            raise UDGError(f"quadruplet {self.id} has no folder; read it with read_index(folder)")
        return self.root / getattr(self, which)

    def load_normal(self) -> np.ndarray:
        return images.load_image(self.path("normal"), f"quadruplet {self.id} normal")

    def load_abnormal(self) -> np.ndarray:
        return images.load_image(self.path("abnormal"), f"quadruplet {self.id} abnormal")

    def load_mask(self) -> np.ndarray:
        return images.load_mask(self.path("mask"), f"quadruplet {self.id} mask")

    def to_json(self) -> dict:
        data = {
            "id": self.id,
            "normal": self.normal,
            "abnormal": self.abnormal,
            "mask": self.mask,
            "object_name": self.object_name,
            "category": self.category,
            "caption": self.caption,
        }
        if self.size is not None:
            data["height"], data["width"] = int(self.size[0]), int(self.size[1])
        data.update(self.extra)
        return data


# ------------------------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class UDGProblem:
    """One problem found in a UDG folder: where (index line, file) and what to do."""

    line: int  # 1-based line of index.jsonl; 0 for folder-level problems
    message: str

    def __str__(self) -> str:
        return self.message


def _relative_path(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise UDGError(f'"{key}" must be a non-empty relative path string (got {value!r})')
    posix = PurePosixPath(value.replace("\\", "/"))
    if posix.is_absolute() or ".." in posix.parts:
        raise UDGError(f'"{key}" path {value!r} must be relative to the UDG folder and stay inside it')
    return posix.as_posix()


def _image_size(path: Path, key: str) -> tuple[int, int]:
    if not path.is_file():
        raise UDGError(f'"{key}" file {path} does not exist; add the file or fix the path in the index line')
    try:
        with Image.open(path) as image:
            width, height = image.size
    except OSError as error:
        raise UDGError(f'"{key}" file {path} is not a readable image ({error}); re-write it as PNG') from error
    return height, width


def _parse_line(folder: Path, text: str, check_files: bool) -> Quadruplet:
    try:
        data = json.loads(text.strip())  # no trailing newline: the error column is on this line
    except json.JSONDecodeError as error:
        reason = f"{error.msg} at column {error.colno}"
        raise UDGError(f"is not valid JSON ({reason}); write one JSON object per line") from None
    if not isinstance(data, dict):
        raise UDGError(f"must be a JSON object, got {type(data).__name__}")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise UDGError(f"is missing required keys {', '.join(missing)} (needed: {', '.join(_REQUIRED_KEYS)})")
    sample_id = data["id"]
    if not isinstance(sample_id, str) or not SAMPLE_ID_PATTERN.match(sample_id):
        raise UDGError(f'"id" must be a string of letters, digits, ".", "_", "-" (got {sample_id!r})')
    if not isinstance(data["object_name"], str) or not data["object_name"].strip():
        raise UDGError(f'"object_name" must be a non-empty string (got {data["object_name"]!r})')
    if data["category"] not in CATEGORIES:
        raise UDGError(
            f'"category" {data["category"]!r} is not one of the 28 standardized categories; '
            f"map it to one of: {', '.join(CATEGORIES)}"
        )
    problems = caption_problems(data["caption"])
    if problems:
        raise UDGError(f"caption does not follow the Fig. 7 schema: {'; '.join(problems)}")
    paths = {key: _relative_path(data[key], key) for key in ("normal", "abnormal", "mask")}
    size = None
    if "height" in data or "width" in data:
        height, width = data.get("height"), data.get("width")
        if not (isinstance(height, int) and isinstance(width, int) and height > 0 and width > 0):
            raise UDGError(f'"height" and "width" must both be positive integers (got {height!r}, {width!r})')
        size = (height, width)
    if check_files:
        sizes = {key: _image_size(folder / path, key) for key, path in paths.items()}
        if len(set(sizes.values())) != 1:
            detail = ", ".join(f"{key} {folder / paths[key]} is {h}x{w}" for key, (h, w) in sizes.items())
            raise UDGError(f"image sizes differ ({detail}); normal, abnormal and mask must have the same HxW")
        actual = sizes["normal"]
        if size is not None and size != actual:
            raise UDGError(f'"height"/"width" say {size[0]}x{size[1]} but the images are {actual[0]}x{actual[1]}')
        size = actual
        mask_path = folder / paths["mask"]
        try:
            images.load_mask(mask_path, "mask")  # refuses an empty mask: a quadruplet needs a defect region
        except images.InputError as error:
            raise UDGError(f'"mask" file {mask_path} {error.problem}') from None
    extra = {key: value for key, value in data.items() if key not in _KNOWN_KEYS}
    return Quadruplet(
        id=sample_id,
        normal=paths["normal"],
        abnormal=paths["abnormal"],
        mask=paths["mask"],
        caption=data["caption"],
        object_name=data["object_name"],
        category=data["category"],
        root=folder,
        size=size,
        extra=extra,
    )


def _iter_index(folder: str | Path, check_files: bool) -> Iterator[tuple[int, Quadruplet | None, UDGError | None]]:
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if not folder.is_dir():
        raise UDGError(f"{folder} is not a folder; pass a UDG folder containing {INDEX_FILE}")
    if not index_path.is_file():
        raise UDGError(f"{folder} has no {INDEX_FILE}; a UDG folder lists its quadruplets there (one JSON per line)")
    seen: dict[str, int] = {}
    with open(index_path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                quadruplet = _parse_line(folder, text, check_files)
                if quadruplet.id in seen:
                    raise UDGError(f'"id" {quadruplet.id!r} repeats line {seen[quadruplet.id]}; ids must be unique')
                seen[quadruplet.id] = number
            except UDGError as error:
                yield number, None, UDGError(f"{index_path} line {number}: {error}")
                continue
            yield number, quadruplet, None


def read_index(folder: str | Path, check_files: bool = True) -> list[Quadruplet]:
    """Read and validate ``folder/index.jsonl``; raise ``UDGError`` naming the first bad line and its file.

    ``check_files`` (default) also checks that every image exists, that normal, abnormal and mask have the same size
    and that the mask is not empty (this decodes every mask).
    """
    quadruplets = []
    for _number, quadruplet, error in _iter_index(folder, check_files):
        if error is not None:
            raise error
        quadruplets.append(quadruplet)
    if not quadruplets:
        raise UDGError(f"{Path(folder) / INDEX_FILE} lists no quadruplets; write some with write_quadruplet()")
    return quadruplets


def validate(folder: str | Path, check_files: bool = True) -> tuple[list[Quadruplet], list[UDGProblem]]:
    """Read every line of the index; return the valid quadruplets and one problem per bad line (does not raise for
    bad lines, only for a missing folder or index)."""
    valid, problems = [], []
    for number, quadruplet, error in _iter_index(folder, check_files):
        if error is not None:
            problems.append(UDGProblem(number, str(error)))
        else:
            valid.append(quadruplet)
    return valid, problems


# ------------------------------------------------------------------------------------------------------------ writing
def _check_arrays(normal: np.ndarray, abnormal: np.ndarray, mask: np.ndarray, name: str) -> None:
    for label, image in (("normal", normal), ("abnormal", abnormal)):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise UDGError(f"{name}: {label} must be a uint8 (H, W, 3) RGB array (got {image.dtype} {image.shape})")
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise UDGError(f"{name}: mask must be a bool (H, W) array (got {mask.dtype} {mask.shape}); use mask > 127")
    if normal.shape != abnormal.shape or normal.shape[:2] != mask.shape:
        raise UDGError(
            f"{name}: sizes differ (normal {normal.shape[:2]}, abnormal {abnormal.shape[:2]}, mask {mask.shape}); "
            "resize them to one HxW"
        )
    if not mask.any():
        raise UDGError(f"{name}: mask is empty; a quadruplet needs a defect region")


def _png_bytes(array: np.ndarray, compress_level: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


class UDGWriter:
    """Adds quadruplets to a UDG folder: PNGs written atomically first, then one index line appended and flushed.

    A reader therefore never sees an index line whose images are missing. Existing ids in the folder are kept and
    checked for clashes. ``compress_level`` trades PNG size for speed (1: fast, 9: small).
    """

    def __init__(self, folder: str | Path, compress_level: int = 3) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index_path = self.folder / INDEX_FILE
        self.compress_level = compress_level
        self._ids: set[str] = set()
        if self.index_path.is_file():
            for number, text in enumerate(self.index_path.read_bytes().splitlines(), start=1):
                if not text.strip():
                    continue
                try:
                    self._ids.add(json.loads(text.decode("utf-8"))["id"])
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    raise UDGError(
                        f"{self.index_path} line {number} is malformed; fix it (unidg data validate) before adding"
                    ) from None
        self._handle = None

    @property
    def count(self) -> int:
        return len(self._ids)

    def next_id(self) -> str:
        number = len(self._ids)
        while f"{number:06d}" in self._ids:
            number += 1
        return f"{number:06d}"

    def add(
        self,
        normal: np.ndarray,
        abnormal: np.ndarray,
        mask: np.ndarray,
        caption: dict,
        object_name: str,
        category: str,
        sample_id: str | None = None,
        extra: dict | None = None,
    ) -> Quadruplet:
        sample_id = self.next_id() if sample_id is None else sample_id
        name = f"quadruplet {sample_id!r}"
        if not SAMPLE_ID_PATTERN.match(sample_id):
            raise UDGError(f'{name}: ids are letters, digits, ".", "_", "-" (no slashes or spaces)')
        if sample_id in self._ids:
            raise UDGError(f"{name} already exists in {self.index_path}; pick another id")
        if not object_name or not object_name.strip():
            raise UDGError(f"{name}: object_name must be a non-empty string")
        check_category(category)
        validate_caption(caption, f"{name} caption")
        _check_arrays(normal, abnormal, mask, name)
        quadruplet = Quadruplet(
            id=sample_id,
            normal=f"normal/{sample_id}.png",
            abnormal=f"abnormal/{sample_id}.png",
            mask=f"mask/{sample_id}.png",
            caption=caption,
            object_name=object_name,
            category=category,
            root=self.folder,
            size=(int(mask.shape[0]), int(mask.shape[1])),
            extra=dict(extra or {}),
        )
        level = self.compress_level
        atomic_write_bytes(quadruplet.path("normal"), _png_bytes(normal, level))
        atomic_write_bytes(quadruplet.path("abnormal"), _png_bytes(abnormal, level))
        atomic_write_bytes(quadruplet.path("mask"), _png_bytes(mask.astype(np.uint8) * 255, level))
        self._append_line(json.dumps(quadruplet.to_json(), ensure_ascii=False))
        self._ids.add(sample_id)
        return quadruplet

    def _append_line(self, line: str) -> None:
        if self._handle is None:
            # A previous writer that died mid-line leaves no newline: start on a fresh line.
            needs_newline = self.index_path.is_file() and self.index_path.stat().st_size > 0
            if needs_newline:
                with open(self.index_path, "rb") as handle:
                    handle.seek(-1, os.SEEK_END)
                    needs_newline = handle.read(1) != b"\n"
            self._handle = open(self.index_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            if needs_newline:
                self._handle.write("\n")
        self._handle.write(line + "\n")  # one write per line: a reader sees whole lines
        self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def __enter__(self) -> UDGWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_quadruplet(
    folder: str | Path,
    normal: np.ndarray,
    abnormal: np.ndarray,
    mask: np.ndarray,
    caption: dict,
    object_name: str,
    category: str,
    sample_id: str | None = None,
) -> Quadruplet:
    """Add one quadruplet to ``folder`` (created if needed); for many, keep one ``UDGWriter`` open instead."""
    with UDGWriter(folder) as writer:
        return writer.add(normal, abnormal, mask, caption, object_name, category, sample_id=sample_id)


def count_by(quadruplets: Iterable[Quadruplet], key: str) -> dict[str, int]:
    """Counts per ``category`` or ``object_name``, most frequent first."""
    counts: dict[str, int] = {}
    for quadruplet in quadruplets:
        value = getattr(quadruplet, key)
        counts[value] = counts.get(value, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
