"""``unidg eval instructions``: does a UniDG-Text bundle paint the defect its instruction names?

Without a reference, the instruction is the only input that says which defect to add; but the target mask's shape and
the source object carry category cues too (a UDG category comes with its own shapes and objects), so a generated
defect can be classified right while the instruction is ignored. The measurement is therefore paired. Every held-out
quadruplet i (its normal image as the source, its mask as the target region) is generated twice with one seed: under
its own no-reference instruction A_i, and under B_i, the instruction of another quadruplet j = p(i) of a different
category (p a seeded derangement: per seed, every instruction is also used once as another quadruplet's B). A
classifier names the category of each generated image, and per quadruplet, with c the true categories,

    matched_i = ([pred(A_i) = c_i] + [pred(B_i) = c_j]) / 2      crossed_i = ([pred(A_i) = c_j] + [pred(B_i) = c_i]) / 2

A generator that ignored the instruction would produce the same image under A_i and B_i (same source, mask and noise),
so matched_i = crossed_i for every i, whatever cues the mask and source carry: the crossed rate is the
instruction-ignored control, and matched - crossed is what the instruction adds. Standard errors are those of the mean
of the per-quadruplet values (pooled over seeds, a quadruplet's seeds are averaged first, so they are not counted as
independent), with a percentile bootstrap over quadruplets for a 95 % interval of the difference.

Two classifiers (``--classifier``). ``region`` (the default): a linear classifier of pixel statistics inside the
dilated target region (``region_classifier``), trained here on a training UDG folder (``--train-data``); it sees the
painted defect itself and names the held-out real defects right far more often. ``recog``: the Defect-Recog classifier
(``unidg train reward-recog``, as the RFT reward applies it: the whole generated image resized to its input size), its
top class among the 28 categories (``normal`` left out: every instruction names a defect category and the question is
which one the painted defect reads as; a ``normal`` verdict would be a miss under both instructions alike and only
shrink both rates; how often the unrestricted top class is ``normal`` is reported). Either way the classifier's
accuracy on the quadruplets' real defect images, the ceiling of the matched rate, is reported.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from unidg.core.errors import OptionError, UniDGError
from unidg.core.geometry import dilated_target_mask
from unidg.core.instructions import drawn_attributes, no_reference_instruction
from unidg.core.manifest import atomic_write_text
from unidg.core.staging import check_output_folder, staged_folder
from unidg.core.udg import CATEGORIES, Quadruplet, read_index
from unidg.runtime.prompt_encoder import PromptEncoder, PromptError
from unidg.runtime.sampler import MAX_SEED
from unidg.runtime.synthesizer import DefectSynthesizer, SynthesisRequest
from unidg.train.evaluation.bootstrap import interval
from unidg.train.evaluation.datasets import resize_pair
from unidg.train.evaluation.detector_training import as_input
from unidg.train.evaluation.region_classifier import region_features, train_region_classifier
from unidg.train.reward_recog import CLASSES, NORMAL, RECOG_JSON, DefectRecogReward

BOOTSTRAP = 2000
CONFIDENCE = 0.95
DERANGEMENT_TRIES = 10_000
SEED_STRIDE = 1_000_003  # generation seed of quadruplet i in round s: s * SEED_STRIDE + i (distinct for i < stride)
MAX_ROUND_SEED = MAX_SEED // SEED_STRIDE - 1
CATEGORY_COLUMNS = [CLASSES.index(c) for c in CATEGORIES]  # the classifier's outputs without ``normal``
CLASSIFIERS = ("region", "recog")


def parse_seeds(text: str) -> list[int]:
    """``--seeds 0,1,2``: distinct integers >= 0, in the order given."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise OptionError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if not seeds or any(not 0 <= s <= MAX_ROUND_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise OptionError(f"--seeds {text!r}: give distinct integers in [0, {MAX_ROUND_SEED}], e.g. --seeds 0,1,2")
    return seeds


def different_category_partners(categories: Sequence[str], seed: int) -> list[int]:
    """A permutation p with categories[p[i]] != categories[i] for every i, drawn by ``seed``.

    Uniform over such permutations when one turns up among DERANGEMENT_TRIES shuffles; otherwise (categories so
    unequal that few permutations qualify) the members sorted by category in a shuffled order are each paired with
    the one m places further on (cyclically), m the largest category's size: no category spans m + 1 consecutive
    places, so no one meets its own category. One exists exactly when no category holds more than half the items."""
    n = len(categories)
    largest = max(Counter(categories).values(), default=0)
    if n < 2 or 2 * largest > n:
        raise UniDGError(
            f"{n} quadruplet(s), {largest} of one category: a partner of another category for every quadruplet "
            "needs no category to hold more than half of them; use more quadruplets (raise --limit or use a larger "
            "held-out folder)"
        )
    rng = random.Random(seed)
    order = list(range(n))
    for _ in range(DERANGEMENT_TRIES):
        rng.shuffle(order)
        if all(categories[j] != categories[i] for i, j in enumerate(order)):
            return list(order)
    rank = {c: rng.random() for c in sorted(set(categories))}
    rng.shuffle(order)
    order.sort(key=lambda i: rank[categories[i]])  # stable: shuffled within each category
    partners = [0] * n
    for place, i in enumerate(order):
        partners[i] = order[(place + largest) % n]
    return partners


def paired_summary(
    matched: np.ndarray,
    crossed: np.ndarray,
    accuracy: np.ndarray,
    accuracy_crossed: np.ndarray,
    normal: np.ndarray,
    bootstrap: int = BOOTSTRAP,
    bootstrap_seed: int = 0,
) -> dict:
    """Rates and standard errors over quadruplets from per-quadruplet values (each already a mean over its
    generations): matched, crossed, their paired difference with a percentile-bootstrap interval, how often the
    prediction names the quadruplet's own category under its own instruction (``accuracy``) and under the crossed one
    (``accuracy_crossed``: as high when the category read follows the scene, not the instruction), and the share of
    generations whose unrestricted top class is ``normal``."""
    values = {
        "matched": np.asarray(matched, dtype=np.float64),
        "crossed": np.asarray(crossed, dtype=np.float64),
        "accuracy": np.asarray(accuracy, dtype=np.float64),
        "accuracy_crossed": np.asarray(accuracy_crossed, dtype=np.float64),
        "normal": np.asarray(normal, dtype=np.float64),
    }
    n = len(values["matched"])
    if n < 2 or any(len(v) != n for v in values.values()):
        raise ValueError(
            f"per-quadruplet values of unequal lengths or fewer than 2: {[len(v) for v in values.values()]}"
        )
    difference = values["matched"] - values["crossed"]

    def standard_error(v: np.ndarray) -> float:
        return float(v.std(ddof=1) / math.sqrt(n))

    draws = np.random.default_rng(bootstrap_seed).integers(0, n, size=(bootstrap, n))
    low, high = interval(difference[draws].mean(axis=1), CONFIDENCE)
    return {
        "quadruplets": n,
        "matched_rate": float(values["matched"].mean()),
        "matched_se": standard_error(values["matched"]),
        "crossed_rate": float(values["crossed"].mean()),
        "crossed_se": standard_error(values["crossed"]),
        "difference": float(difference.mean()),
        "difference_se": standard_error(difference),
        "difference_ci95": [low, high],
        "matched_above_crossed": int((difference > 0).sum()),
        "crossed_above_matched": int((difference < 0).sum()),
        "accuracy": float(values["accuracy"].mean()),
        "accuracy_se": standard_error(values["accuracy"]),
        "accuracy_crossed": float(values["accuracy_crossed"].mean()),
        "accuracy_crossed_se": standard_error(values["accuracy_crossed"]),
        "normal_share": float(values["normal"].mean()),
    }


def load_classifier(folder: str | Path) -> DefectRecogReward:
    """The Defect-Recog networks of ``folder`` (their own checks name a bad file), refused by name when missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UniDGError(
            f"--recog {folder}: no such folder; train the Defect-Recog classifier with "
            f"`unidg train reward-recog --data UDG_FOLDER --out {folder}`"
        )
    if not (folder / RECOG_JSON).is_file():
        raise UniDGError(
            f"--recog {folder} holds no {RECOG_JSON}, so it is not a Defect-Recog folder; train one with "
            f"`unidg train reward-recog --data UDG_FOLDER --out {folder}`"
        )
    return DefectRecogReward(folder)


@torch.no_grad()
def classify(recog: DefectRecogReward, images: Sequence[np.ndarray]) -> tuple[list[str], list[str]]:
    """Per image: the top class among the 28 categories, and the unrestricted top class (possibly ``normal``)."""
    batch = np.stack([resize_pair(image, np.zeros(image.shape[:2], bool), recog.size)[0] for image in images])
    logits = recog.classifier(as_input(batch).to(recog.device)).cpu()
    restricted = logits[:, CATEGORY_COLUMNS].argmax(dim=1).tolist()
    top = logits.argmax(dim=1).tolist()
    return [CATEGORIES[k] for k in restricted], [CLASSES[k] for k in top]


class Judge(Protocol):
    """Names the defect category of images generated from one source image and target region."""

    name: str

    def classify(
        self, images: Sequence[np.ndarray], source: np.ndarray, region: np.ndarray
    ) -> tuple[list[str], list[str | None]]:
        """Per image: the top class among the 28 categories, and the unrestricted top class (possibly ``normal``;
        None for a classifier without a ``normal`` class)."""
        ...

    def describe(self) -> str: ...


class RecogJudge:
    """The Defect-Recog classifier on the whole image (source and region unused)."""

    name = "recog"

    def __init__(self, folder: str | Path) -> None:
        self.folder = str(folder)
        self.recog = load_classifier(folder)

    def classify(
        self, images: Sequence[np.ndarray], source: np.ndarray, region: np.ndarray
    ) -> tuple[list[str], list[str | None]]:
        restricted, top = classify(self.recog, images)
        return restricted, list(top)

    def describe(self) -> str:
        return (
            f"Classifier: Defect-Recog `{self.folder}` (the whole image at {self.recog.size} px), top class of the 28 "
            "categories."
        )


class RegionJudge:
    """The region classifier, trained on ``train_data`` at the generator's resolution and dilation."""

    name = "region"

    def __init__(self, train_data: str | Path, size: int, kernel: int, iterations: int) -> None:
        self.size = size
        self.model, self.training = train_region_classifier(train_data, size, kernel, iterations)

    def classify(
        self, images: Sequence[np.ndarray], source: np.ndarray, region: np.ndarray
    ) -> tuple[list[str], list[str | None]]:
        features = np.stack([region_features(image, source, region, self.size) for image in images])
        return self.model.predict(features), [None] * len(images)

    def describe(self) -> str:
        t = self.training
        return (
            f"Classifier: region statistics (the abnormal image and its change from the normal one inside the "
            f"dilated mask, at {t['size']} px; no mask size or shape), linear softmax trained on `{t['train_data']}` "
            f"({t['quadruplets']} quadruplets, {len(t['categories'])} categories, training accuracy "
            f"{_percent(t['train_accuracy'])})."
        )


def check_classifier_options(classifier: str, recog: str | Path | None, train_data: str | Path | None) -> None:
    """Refuse a classifier without its input, or an input the chosen classifier would not use."""
    if classifier not in CLASSIFIERS:
        raise OptionError(f"--classifier {classifier!r}: give one of {', '.join(CLASSIFIERS)}")
    if classifier == "region":
        if train_data is None:
            raise OptionError(
                "--classifier region trains its classifier on the real defects of a training UDG folder: give "
                "--train-data DIR (e.g. out/nano/data/train, the folder the bundle's model was trained on), or use "
                "--classifier recog --recog DEFECT_RECOG_FOLDER"
            )
        if recog is not None:
            raise OptionError("--recog is read only with --classifier recog; leave it out or add --classifier recog")
    else:
        if recog is None:
            raise OptionError(
                "--classifier recog needs --recog DEFECT_RECOG_FOLDER (`unidg train reward-recog`), or use "
                "--classifier region --train-data DIR"
            )
        if train_data is not None:
            raise OptionError("--train-data is read only with --classifier region; leave it out")


def open_text_bundle(bundle: str | Path, threads: int | None) -> DefectSynthesizer:
    """The bundle's synthesizer (onnxruntime), refused by name unless it is a UniDG-Text bundle."""
    synthesizer = DefectSynthesizer.from_bundle(bundle, threads=threads)
    if synthesizer.prompts is None:
        synthesizer.close()
        raise UniDGError(
            f"--bundle {bundle} is a reference-mode bundle (no text encoders), so it cannot take an instruction; "
            "give a UniDG-Text bundle (`unidg train text`, `unidg train merge`, then `unidg export onnx`)"
        )
    return synthesizer


def measure_instructions(
    bundle: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    classifier: str = "region",
    recog: str | Path | None = None,
    train_data: str | Path | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    limit: int = 0,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Generate every held-out quadruplet under its own and a crossed instruction per seed, classify with
    ``classifier`` (``region``: trained on ``train_data``; ``recog``: the Defect-Recog folder ``recog``), and write
    ``out``/report.json and report.md (the folder appears whole or not at all). Returns the report."""
    started = time.perf_counter()
    check_classifier_options(classifier, recog, train_data)
    if limit < 0:
        raise OptionError(f"--limit {limit}: give a count >= 1, or 0 for every quadruplet")
    if threads is not None and threads < 1:
        raise OptionError(f"--threads {threads}: give a thread count >= 1, or leave it out to use all cores")
    check_output_folder(out, replace=overwrite)  # refused before anything is generated
    quadruplets = read_index(data)[: limit or None]
    if len(quadruplets) >= SEED_STRIDE:
        raise OptionError(f"--data {data}: {len(quadruplets)} quadruplets; give --limit {SEED_STRIDE - 1} or fewer")
    categories = [q.category for q in quadruplets]
    partners = {seed: different_category_partners(categories, seed) for seed in seeds}  # refused before generating
    samples = []
    with open_text_bundle(bundle, threads) as synthesizer:
        kernel, iterations = synthesizer.settings.dilate_kernel, synthesizer.settings.dilate_iterations
        judge: Judge
        if classifier == "region":
            judge = RegionJudge(train_data, synthesizer.bundle.resolution, kernel, iterations)
        else:
            judge = RecogJudge(recog)
        # The ceiling: the real defect images, their masks dilated as the generator dilates a target mask.
        real = [
            judge.classify(
                [q.load_abnormal()], q.load_normal(), dilated_target_mask(q.load_mask(), kernel, iterations)
            )[0][0]
            for q in quadruplets
        ]
        real_correct = np.array([p == c for p, c in zip(real, categories)], dtype=np.float64)
        bar = tqdm(total=2 * len(seeds) * len(quadruplets), desc="instructions", unit="image", disable=not progress)
        for seed in seeds:
            samples += run_seed(synthesizer, judge, quadruplets, partners[seed], seed, bar)
        bar.close()
        fingerprint, text_tokens = synthesizer.bundle.fingerprint, synthesizer.bundle.text_tokens
    trained = set(judge.training["categories"]) if isinstance(judge, RegionJudge) else set(CATEGORIES)
    report = {
        "bundle": str(bundle),
        "bundle_fingerprint": fingerprint,
        "text_tokens": text_tokens,
        "data": str(data),
        "classifier": classifier,
        "classifier_description": judge.describe(),
        "recog": None if recog is None else str(recog),
        "region_classifier": judge.training if isinstance(judge, RegionJudge) else None,
        "untrained_categories": sorted(set(categories) - trained),
        "quadruplets": len(quadruplets),
        "categories": len(set(categories)),
        "seeds": list(seeds),
        "generations": 2 * len(samples),
        "chance": 1.0 / len(CATEGORIES),
        "real_accuracy": float(real_correct.mean()),
        "real_accuracy_se": float(real_correct.std(ddof=1) / math.sqrt(len(real_correct))),
        "per_seed": {str(seed): summarize([s for s in samples if s["seed"] == seed]) for seed in seeds},
        "pooled": summarize(samples),
        "samples": samples,
    }
    report["seconds"] = time.perf_counter() - started
    with staged_folder(out, replace=overwrite) as folder:
        atomic_write_text(folder / "report.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(folder / "report.md", markdown(report))
    return report


def own_instruction(quadruplet: Quadruplet, seed: int, prompts: PromptEncoder) -> tuple[str, int]:
    """A quadruplet's no-reference instruction, its attribute words drawn by (seed, id) as in training, and how many
    of them were dropped (the last first) to fit the bundle's K T5 tokens: training truncated such instructions
    silently, the runtime refuses them. The bare form is refused only where K cannot hold the category's name."""
    attributes = drawn_attributes(quadruplet.caption, seed, quadruplet.id)
    keep = len(attributes)
    while True:
        text = no_reference_instruction(quadruplet.category, attributes[:keep])
        try:
            return prompts.check(text, f"quadruplet {quadruplet.id}"), len(attributes) - keep
        except PromptError:
            if keep == 0:
                raise
            keep -= 1


def run_seed(
    synthesizer: DefectSynthesizer,
    judge: Judge,
    quadruplets: Sequence[Quadruplet],
    partners: Sequence[int],
    seed: int,
    bar: tqdm,
) -> list[dict]:
    """Every quadruplet generated under its own and its partner's instruction with the same noise, classified."""
    texts, dropped = zip(*(own_instruction(q, seed, synthesizer.prompts) for q in quadruplets))
    samples = []
    for index, quadruplet in enumerate(quadruplets):
        partner = quadruplets[partners[index]]
        source, mask = quadruplet.load_normal(), quadruplet.load_mask()
        images, region = [], None
        for form, text in (("own", texts[index]), ("crossed", texts[partners[index]])):
            request = SynthesisRequest(
                None,
                None,
                source,
                mask,
                seed=seed * SEED_STRIDE + index,
                prompt=text,
                name=f"quadruplet {quadruplet.id} (seed {seed}, {form} instruction)",
            )
            result = synthesizer.generate(request)
            images.append(result.image)
            region = result.mask  # the dilated target region: the same for both instructions
            bar.update()
        change = np.abs(images[0].astype(np.int16) - images[1].astype(np.int16))[region]
        (predicted_own, predicted_crossed), (top_own, top_crossed) = judge.classify(images, source, region)
        samples.append(
            {
                "seed": seed,
                "id": quadruplet.id,
                "category": quadruplet.category,
                "partner": partner.id,
                "partner_category": partner.category,
                "instruction": texts[index],
                "attributes_dropped": dropped[index],
                "crossed_instruction": texts[partners[index]],
                "predicted_own": predicted_own,
                "predicted_crossed": predicted_crossed,
                "top_own": top_own,
                "top_crossed": top_crossed,
                "region_change": float(change.mean()),
            }
        )
    return samples


def summarize(samples: Sequence[dict]) -> dict:
    """``paired_summary`` of generated samples; a quadruplet's seeds are averaged into one value first."""
    per: dict[str, list[tuple[float, ...]]] = {}
    for s in samples:
        own, other = s["category"], s["partner_category"]
        per.setdefault(s["id"], []).append(
            (
                ((s["predicted_own"] == own) + (s["predicted_crossed"] == other)) / 2,
                ((s["predicted_own"] == other) + (s["predicted_crossed"] == own)) / 2,
                float(s["predicted_own"] == own),
                float(s["predicted_crossed"] == own),
                ((s["top_own"] == NORMAL) + (s["top_crossed"] == NORMAL)) / 2,
            )
        )
    summary = paired_summary(*np.array([np.mean(v, axis=0) for v in per.values()]).T)
    summary["generations"] = 2 * len(samples)
    # Whether the instruction changes the output at all: with the same noise, an ignored one changes nothing.
    summary["same_prediction"] = float(np.mean([s["predicted_own"] == s["predicted_crossed"] for s in samples]))
    summary["region_change"] = float(np.mean([s["region_change"] for s in samples]))
    summary["shortened_instructions"] = sum(s["attributes_dropped"] > 0 for s in samples)
    return summary


def _percent(value: float, se: float | None = None) -> str:
    return f"{100 * value:.1f} %" + (f" ± {100 * se:.1f}" if se is not None else "")


def markdown(report: dict) -> str:
    lines = [
        "# Instruction agreement (no reference)",
        "",
        f"Bundle `{report['bundle']}` (fingerprint {report['bundle_fingerprint'][:12]}), held-out "
        f"`{report['data']}`: {report['quadruplets']} quadruplets, {report['categories']} categories, seeds "
        f"{', '.join(map(str, report['seeds']))}; {report['generations']} generations in {report['seconds']:.0f} s.",
        "",
        report["classifier_description"],
        "",
        "Each quadruplet is generated under its own instruction and under the instruction of a quadruplet of another "
        "category, with the same seed. *Matched*: the prediction is the category of the instruction used; "
        "*crossed*: it is the category of the instruction not used (the instruction-ignored control: a generator "
        "that ignored it would score matched = crossed). ± is one standard error over quadruplets.",
        "",
        "| seeds | N | matched | crossed | matched − crossed | 95 % interval | + / − | own category: own "
        "instr. | own category: crossed instr. | normal | same | change |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    has_normal = report["classifier"] == "recog"  # the region classifier has no ``normal`` class
    rows = [(seed, summary) for seed, summary in report["per_seed"].items()]
    if len(rows) > 1:
        rows.append(("pooled", report["pooled"]))
    for name, s in rows:
        low, high = s["difference_ci95"]
        lines.append(
            f"| {name} | {s['quadruplets']} | {_percent(s['matched_rate'], s['matched_se'])} | "
            f"{_percent(s['crossed_rate'], s['crossed_se'])} | {_percent(s['difference'], s['difference_se'])} | "
            f"[{100 * low:.1f}, {100 * high:.1f}] | {s['matched_above_crossed']} / {s['crossed_above_matched']} | "
            f"{_percent(s['accuracy'], s['accuracy_se'])} | "
            f"{_percent(s['accuracy_crossed'], s['accuracy_crossed_se'])} | "
            f"{_percent(s['normal_share']) if has_normal else '—'} | "
            f"{_percent(s['same_prediction'])} | {s['region_change']:.1f} |"
        )
    lines += [
        "",
        "*+ / −*: quadruplets whose matched value is above / below their crossed value. *Own category*: the "
        "prediction names the quadruplet's own category, under its own instruction (plain accuracy) and under the "
        "crossed one (as high if the category read follows the scene rather than the instruction). *Normal*: "
        "generations whose unrestricted top class is `normal` (—: the classifier has no `normal` class). *Same*: "
        "pairs whose two generations get the same "
        "prediction. *Change*: the mean absolute difference (0–255) between a pair's two images in the target "
        "region. Pooled values average a quadruplet's seeds first.",
        "",
        *(
            [
                f"Held-out categories absent from the classifier's training data (never predicted): "
                f"{', '.join(report['untrained_categories'])}.",
                "",
            ]
            if report["untrained_categories"]
            else []
        ),
        f"Context: chance is {_percent(report['chance'])}; the classifier names "
        f"{_percent(report['real_accuracy'], report['real_accuracy_se'])} of these quadruplets' real defect images "
        "right (the ceiling of the matched rate). Instructions shortened to the bundle's "
        f"K = {report['text_tokens']} T5 tokens (attribute words dropped, the last first; training truncated them): "
        f"{report['pooled']['shortened_instructions']} of {report['generations'] // 2}.",
        "",
    ]
    return "\n".join(lines)
