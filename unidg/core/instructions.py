"""Instructions of UniDG-Text (paper App. B.3), built from UDG captions; every template lives here.

Two forms:
- with a reference: ``REFERENCE_INSTRUCTION`` (the diptych's left half is the reference crop, as in reference mode);
- without one: "Add the {attributes} {category} defect to the image." — the left half is black and the image-encoder
  tokens are zeros; the attributes are words of the caption's first defect entry (size, shape, colour, contrast,
  edge, ...), the fields that say "unknown" or nothing left out.

The choice among the attribute phrasings is reproducible: it depends only on the seed and the sample id.
"""

from __future__ import annotations

import hashlib
import random

from unidg.core.udg import check_category

REFERENCE_INSTRUCTION = "Migrate the defect from the reference image to the target scene."
NO_REFERENCE_TEMPLATE = "Add the {attributes}{category} defect to the image."
# Caption fields that describe a defect's look, in the order an adjective phrase reads well.
ATTRIBUTE_FIELDS = ("size", "severity", "shape", "edge", "contrast", "color", "direction")
MAX_ATTRIBUTES = 3
UNSAID = {"", "unknown", "none", "n/a", "not applicable"}


def defect_attributes(caption: dict) -> list[str]:
    """The look of the caption's first defect: the ATTRIBUTE_FIELDS it fills, in that order."""
    entries = caption.get("defect-level") or [{}]
    defect = entries[0] if isinstance(entries[0], dict) else {}
    words = []
    for name in ATTRIBUTE_FIELDS:
        value = defect.get(name)
        if isinstance(value, str) and value.strip().lower() not in UNSAID:
            words.append(" ".join(value.split()))
    return words


def _rng(seed: int, sample_id: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def drawn_attributes(caption: dict, seed: int, sample_id: str) -> list[str]:
    """The attribute words of a no-reference instruction: up to MAX_ATTRIBUTES of the caption's, which ones and how
    many chosen by (seed, sample_id), in the reading order of ATTRIBUTE_FIELDS."""
    words = defect_attributes(caption)
    rng = _rng(seed, sample_id)
    count = rng.randint(0, min(MAX_ATTRIBUTES, len(words))) if words else 0
    return [words[i] for i in sorted(rng.sample(range(len(words)), count))]


def no_reference_instruction(category: str, attributes: list[str]) -> str:
    """NO_REFERENCE_TEMPLATE filled: the attributes comma-separated, then the category."""
    check_category(category)
    phrase = ", ".join(attributes)
    return NO_REFERENCE_TEMPLATE.format(attributes=f"{phrase} " if phrase else "", category=category)


def instruction(caption: dict, category: str, *, with_reference: bool, seed: int = 0, sample_id: str = "") -> str:
    """The instruction of one training sample or request: the reference form, or the attribute form drawn from the
    caption (up to MAX_ATTRIBUTES of its attributes, which ones and how many chosen by (seed, sample_id))."""
    check_category(category)
    if with_reference:
        return REFERENCE_INSTRUCTION
    return no_reference_instruction(category, drawn_attributes(caption, seed, sample_id))
