"""The demo's sample cases (``runtime/assets/samples/``): held-out procedural quadruplets, rebuilt by

    python -m unidg.train.make_demo_samples --out runtime/assets/samples

Each case takes the abnormal image of one procedural quadruplet as the reference (its mask marks the defect) and the
normal image of another as the source (its own mask of the same defect type is the target region), on the same
object (intra-object transfer) or on another one (cross-object transfer), as in Diversity-SFT's pairs. Quadruplets
come from ``unidg.train.procedural.make_sample`` with seed ``HELD_OUT_SEED``, which no training set uses (UniDG-nano is
trained on seed 1, see configs/nano-base.toml), so the demo shows pictures the model has not seen.

Draws are tried in a fixed order until one is clearly visible (defect area, contrast with its surface, contrast of
the reference defect with the source region it goes to), so the output is a pure function of this file and the
generator: the same PNG pixels on every run.
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from unidg.core.manifest import atomic_write_bytes, atomic_write_text
from unidg.runtime.cli_options import add_out_option
from unidg.train.procedural import DEFECTS, SURFACES, Sample, defect_category, make_sample, sample_shapes

HELD_OUT_SEED = 7  # training data: seed 1 (configs/nano-base.toml)
IMAGE_SIZE = 160  # square side; non-square images are 160 x 200 or 200 x 160 (procedural.sample_shapes)
MAX_DRAWS = 400
SAMPLES_FILE = "samples.json"

# Acceptance of a draw: the defect must be plainly visible in the reference and against the source region.
MIN_AREA, MAX_AREA = 0.008, 0.16  # share of the image inside the mask
MIN_REFERENCE_CONTRAST = 45.0  # mean |abnormal - normal| inside the reference mask, 8-bit levels
MIN_TRANSFER_CONTRAST = 70.0  # |mean RGB of the reference defect - mean RGB of the source region|


@dataclass(frozen=True)
class DemoCase:
    """One demo case: ``defect`` (a key of procedural.DEFECTS) from ``reference_object`` into ``source_object``."""

    id: str
    defect: str
    reference_object: str
    source_object: str
    reference_shape: str = "square"  # "square", "tall" (H > W) or "wide" (W > H)
    source_shape: str = "square"
    seed: int = 0  # noise seed of the demo run

    @property
    def transfer(self) -> str:
        return "intra-object" if self.reference_object == self.source_object else "cross-object"


CASES: tuple[DemoCase, ...] = (
    DemoCase("rust-on-metal", "rust", "metal plate", "metal plate", source_shape="wide"),
    DemoCase("stain-wood-to-fabric", "stain", "wood board", "fabric", source_shape="tall"),
    DemoCase("scratch-metal-to-wood", "scratch", "metal plate", "wood board", reference_shape="tall"),
    DemoCase("hole-on-leather", "hole", "leather", "leather"),
    DemoCase("black-spot-tile-to-fruit", "black spot", "ceramic tile", "fruit skin", source_shape="wide"),
    DemoCase("crack-brick-to-tile", "crack", "brick wall", "ceramic tile", reference_shape="wide"),
)


def _shape(kind: str, size: int) -> tuple[int, int]:
    square, tall, wide = sample_shapes(size)[0], sample_shapes(size)[2], sample_shapes(size)[1]
    return {"square": square, "tall": tall, "wide": wide}[kind]


def _area(mask: np.ndarray) -> float:
    return float(mask.mean())


def _visible(reference: Sample, source: Sample) -> bool:
    if not (MIN_AREA <= _area(reference.mask) <= MAX_AREA and MIN_AREA <= _area(source.mask) <= MAX_AREA):
        return False
    inside = reference.mask
    contrast = np.abs(reference.abnormal.astype(np.float64) - reference.normal)[inside].mean()
    if contrast < MIN_REFERENCE_CONTRAST:
        return False
    defect_color = reference.abnormal[inside].astype(np.float64).mean(axis=0)
    region_color = source.normal[source.mask].astype(np.float64).mean(axis=0)
    return float(np.linalg.norm(defect_color - region_color)) >= MIN_TRANSFER_CONTRAST


def build_case(index: int, case: DemoCase, size: int = IMAGE_SIZE) -> tuple[Sample, Sample, int]:
    """(reference quadruplet, source quadruplet, draw number) of the first visible draw of ``case``."""
    surfaces = {surface.name: surface for surface in SURFACES}
    for name in (case.reference_object, case.source_object):
        if name not in surfaces:
            raise ValueError(f"demo case {case.id!r}: unknown object {name!r}; objects: {sorted(surfaces)}")
    if case.defect not in DEFECTS:
        raise ValueError(f"demo case {case.id!r}: unknown defect {case.defect!r}; defects: {sorted(DEFECTS)}")
    for draw in range(MAX_DRAWS):
        reference = make_sample(
            surfaces[case.reference_object],
            case.defect,
            _shape(case.reference_shape, size),
            np.random.default_rng([HELD_OUT_SEED, index, draw, 0]),
        )
        source = make_sample(
            surfaces[case.source_object],
            case.defect,
            _shape(case.source_shape, size),
            np.random.default_rng([HELD_OUT_SEED, index, draw, 1]),
        )
        if _visible(reference, source):
            return reference, source, draw
    raise ValueError(f"demo case {case.id!r}: no clearly visible draw in {MAX_DRAWS}; relax the acceptance bounds")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _mask_png(mask: np.ndarray) -> bytes:
    return _png(np.where(mask, 255, 0).astype(np.uint8))


def make_demo_samples(out: str | Path, size: int = IMAGE_SIZE, cases: tuple[DemoCase, ...] = CASES) -> list[dict]:
    """Write the cases' PNGs and ``samples.json`` to ``out`` (files written atomically); returns the case list."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries, written = [], set()
    for index, case in enumerate(cases):
        reference, source, draw = build_case(index, case, size)
        files = {
            "reference": (f"{case.id}_reference.png", _png(reference.abnormal)),
            "reference_mask": (f"{case.id}_reference_mask.png", _mask_png(reference.mask)),
            "source": (f"{case.id}_source.png", _png(source.normal)),
            "mask": (f"{case.id}_mask.png", _mask_png(source.mask)),
        }
        for name, data in files.values():
            atomic_write_bytes(out / name, data)
            written.add(name)
        entries.append(
            {
                "id": case.id,
                **{key: name for key, (name, _) in files.items()},
                "category": defect_category(case.defect),
                "seed": case.seed,
                "object_name": case.source_object,
                "defect_type": case.defect,
                "reference_object": case.reference_object,
                "transfer": case.transfer,
                "generator": {"seed": HELD_OUT_SEED, "case": index, "draw": draw, "size": size},
            }
        )
    for stale in out.glob("*.png"):  # PNGs of cases no longer listed
        if stale.name not in written:
            stale.unlink()
    atomic_write_text(out / SAMPLES_FILE, json.dumps(entries, indent=2) + "\n")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m unidg.train.make_demo_samples",
        description="Write the demo's sample cases (held-out procedural quadruplets) and samples.json to --out.",
    )
    add_out_option(parser, "samples folder (default: the shipped one)", default="runtime/assets/samples")
    parser.add_argument("--size", type=int, default=IMAGE_SIZE, help=f"image side in pixels (default {IMAGE_SIZE})")
    args = parser.parse_args(argv)
    entries = make_demo_samples(args.out, size=args.size)
    total = sum(path.stat().st_size for path in Path(args.out).glob("*.png"))
    for entry in entries:
        print(f"{entry['id']:<28} {entry['transfer']:<13} {entry['category']:<15} draw {entry['generator']['draw']}")
    print(f"wrote {len(entries)} cases to {args.out} ({total / 1024:.0f} KiB of PNG)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
