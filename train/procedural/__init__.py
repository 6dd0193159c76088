"""Procedural UDG quadruplets: real and procedural textures as normal images, rule-based defects inside UniADC
shape-prior masks, template captions in the Fig. 7 schema.

No defect dataset is reachable offline, so the demo model and the tests learn from this generator. It is built so
that reference-based transfer has something to learn and the Diversity-SFT pairs agree with it. Samples come in
lots: 2-3 samples of one (object, defect) on one product (the same normal image, flipped at random), like photos from
one production line. Each round of a category puts it on two objects, and those two lots form a defect family with
one look (a colour placed in each defect's own colour ranges, jittered per sample), so intra-object and cross-object
pairs exist from the first few samples on and Alg. 2's colour score finds references that look like the target.
Families differ in look, so a reference still carries information the model must copy: the colour of a defect kind
is not fixed, it has to be read from the reference.

Normal images: scikit-image's bundled photos (brick, grass, gravel, text, coins, camera, astronaut, coffee, rocket),
cropped, flipped and recoloured, plus procedural surfaces (fabric weave, brushed metal, wood rings, paint, tiles,
leather, fruit skin, a bottle cap on a background). The abnormal image equals the normal one outside the mask, pixel
for pixel.
"""

from __future__ import annotations

from unidg.train.procedural.defects import COMBINED, DEFECTS, SEVERITY, SHAPE_WORDS, Defect, defect_category
from unidg.train.procedural.pixels import Rgb, color_name
from unidg.train.procedural.plan import (
    DATASET_FILE,
    GENERATOR_VERSION,
    PlannedSample,
    check_tables,
    plan,
    sample_shapes,
    synthesize,
)
from unidg.train.procedural.samples import MIN_VISIBLE_DIFFERENCE, Sample, look_color, make_caption, make_sample
from unidg.train.procedural.surfaces import SURFACES, Surface

__all__ = [
    "COMBINED",
    "DATASET_FILE",
    "DEFECTS",
    "Defect",
    "GENERATOR_VERSION",
    "MIN_VISIBLE_DIFFERENCE",
    "PlannedSample",
    "Rgb",
    "SEVERITY",
    "SHAPE_WORDS",
    "SURFACES",
    "Sample",
    "Surface",
    "check_tables",
    "color_name",
    "defect_category",
    "look_color",
    "make_caption",
    "make_sample",
    "plan",
    "sample_shapes",
    "synthesize",
]
