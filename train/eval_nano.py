"""``unidg train eval-nano``: does a weights folder transfer the reference defect's colour into the target region?

On held-out quadruplets (a synth seed never used in training), pairs are drawn from the three Diversity-SFT
distributions in equal parts (``train.pairs``); each pair is generated with the torch reference sampler
(``train.sampler.generate``: Alg. 1 diptych, 28-step flow, paste-back). Inside the target mask (source size, not
dilated) a sample counts as a transfer when the mean RGB of the output is closer (Euclidean) to the mean RGB of the
reference defect (reference abnormal image inside the reference mask) than to the mean RGB of the clean source there.
The transfer rate is the fraction of such samples. A contact sheet shows reference | source + mask | output rows.

Two ceilings put the rate in context (``ceilings=True``): the same criterion applied to the ground-truth target
(the target's own abnormal image; for intra-/cross-object pairs its defect is not the reference's, so even the truth
does not always "transfer"), and to the ground truth after the model's autoencoder round trip at S (encode the
result diptych, decode, paste back): what a generator that reproduced the training target exactly could score.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from unidg.core.errors import OptionError
from unidg.core.geometry import paste_back, result_diptych, right_half
from unidg.core.latents import model_to_pixels, pixels_to_model
from unidg.core.manifest import atomic_write_bytes, atomic_write_text
from unidg.core.udg import UDGError, read_index
from unidg.runtime.demo import mask_outline
from unidg.runtime.step_cache import OFF, StepCache
from unidg.train.pairs import DISTRIBUTIONS, TrainingPair, diversity_sft_pairs


def mean_color(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return image[mask].astype(np.float64).mean(axis=0)


def transfer_scores(output: np.ndarray, source: np.ndarray, target_mask: np.ndarray, reference_color: np.ndarray):
    """(distance of the output's masked mean colour to the reference defect's, to the clean source's)."""
    out = mean_color(output, target_mask)
    return float(np.linalg.norm(out - reference_color)), float(np.linalg.norm(out - mean_color(source, target_mask)))


def _closer_to_reference(image: np.ndarray, source: np.ndarray, target_mask: np.ndarray, reference_color) -> bool:
    to_reference, to_source = transfer_scores(image, source, target_mask, reference_color)
    return to_reference < to_source


def autoencoder_round_trip(model, pair, truth: np.ndarray) -> np.ndarray:
    """The ground-truth target as the model's autoencoder can return it: the Alg. 1 result diptych at S, encoded,
    decoded, pasted back into the source (source-sized uint8)."""
    # torch and the model load only where a model runs: ``evaluation_pairs`` and the scores stay light for the
    # evaluation commands that only read images.
    import torch

    diptych = model.settings.diptych(
        pair.reference.load_abnormal(), pair.reference.load_mask(), pair.target.load_normal(), pair.target.load_mask()
    )
    result = result_diptych(diptych, truth)
    with torch.no_grad():
        pixels = torch.from_numpy(pixels_to_model(result[None])).to(model.device)
        decoded = model_to_pixels(model.decode_latents(model.encode_images(pixels)).float().cpu().numpy())[0]
    return paste_back(diptych, right_half(decoded), pair.target.load_normal())


def evaluation_pairs(folder: str | Path, count: int, seed: int, keep: Callable[[TrainingPair], bool] | None = None):
    """``count`` pairs, equal parts of the three distributions (as available), deterministic for ``seed``; with
    ``keep``, drawn from the pairs it accepts only (so nothing is generated for a pair a figure would drop)."""
    quadruplets = list(read_index(folder))
    if not quadruplets:
        raise UDGError(f"{folder} holds no quadruplets; make a held-out set with `unidg data synth`")
    pairs = diversity_sft_pairs(quadruplets, seed)
    if keep is not None:
        pairs = [pair for pair in pairs if keep(pair)]
    rng = np.random.default_rng([seed, 0xE7A1])
    groups = [[p for p in pairs if p.distribution == name] for name in DISTRIBUTIONS]
    groups = [[group[i] for i in rng.permutation(len(group))] for group in groups if group]
    chosen = []
    while len(chosen) < count and any(groups):
        for group in groups:
            if group and len(chosen) < count:
                chosen.append(group.pop())
    return chosen


def make_contact_sheet(rows: list[tuple[np.ndarray, ...]], labels: list[str], cell: int = 160) -> Image.Image:
    """Rows of (reference with its mask outlined, source with the target mask outlined, output), one pair a row."""
    header = 18
    sheet = Image.new("RGB", (3 * cell + 4 * 4, len(rows) * (cell + header) + 22), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(("reference (defect outlined)", "source + target mask", "UniDG-nano output")):
        draw.text((4 + column * (cell + 4), 4), title, fill="black")
    for r, (images, label) in enumerate(zip(rows, labels)):
        top = 22 + r * (cell + header)
        draw.text((4, top), label, fill="black")
        for column, image in enumerate(images):
            tile = Image.fromarray(image)
            tile.thumbnail((cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(tile, (4 + column * (cell + 4), top + header - 4))
    return sheet


def evaluate_transfer(
    weights: str | Path,
    data: str | Path,
    count: int = 60,
    seed: int = 0,
    steps: int | None = None,
    contact_sheet: str | Path | None = None,
    sheet_rows: int = 8,
    out_json: str | Path | None = None,
    model=None,
    ceilings: bool = False,
    progress: bool = True,
    keep: Callable[[TrainingPair], bool] | None = None,
    pairs: list[TrainingPair] | None = None,
    cache: StepCache = OFF,
) -> dict:
    """Transfer rate of ``weights`` on ``count`` held-out pairs; optional contact sheet PNG and JSON report, and
    optionally the ground-truth and autoencoder-round-trip ceilings (module docstring). ``progress``: a bar over the
    pairs on stderr; ``keep``: only pairs it accepts are drawn (``evaluation_pairs``); ``pairs``: these pairs
    instead of drawing; ``cache``: the step-cache setting the samples are generated with."""
    # torch and the model load here: drawing and scoring pairs (evaluation_pairs, the eval commands) need numpy alone.
    import torch

    from unidg.train.loading import load_model
    from unidg.train.sampler import generate

    if count < 1:
        raise OptionError(f"--count {count}: give a count >= 1")
    model = load_model(weights) if model is None else model
    pairs = evaluation_pairs(data, count, seed, keep) if pairs is None else pairs
    samples, rows, labels = [], [], []
    started = time.time()
    for i, pair in enumerate(tqdm(pairs, desc="transfer", unit="pair", disable=not progress)):
        reference, reference_mask = pair.reference.load_abnormal(), pair.reference.load_mask()
        source, target_mask = pair.target.load_normal(), pair.target.load_mask()
        with torch.no_grad():
            output = generate(
                model, reference, reference_mask, source, target_mask, seed=seed + i, steps=steps, cache=cache
            )
        reference_color = mean_color(reference, reference_mask)
        to_reference, to_source = transfer_scores(output, source, target_mask, reference_color)
        sample = {
            "reference": pair.reference.id,
            "target": pair.target.id,
            "distribution": pair.distribution,
            "category": pair.target.category,
            "distance_to_reference": to_reference,
            "distance_to_source": to_source,
            "transfer": to_reference < to_source,
        }
        if ceilings:
            truth = pair.target.load_abnormal()
            sample["truth_transfer"] = _closer_to_reference(truth, source, target_mask, reference_color)
            round_trip = autoencoder_round_trip(model, pair, truth)
            sample["round_trip_transfer"] = _closer_to_reference(round_trip, source, target_mask, reference_color)
        samples.append(sample)
        if len(rows) < sheet_rows:
            rows.append((mask_outline(reference, reference_mask), mask_outline(source, target_mask), output))
            labels.append(f"{pair.distribution}: {pair.reference.category} -> {pair.target.object_name}")
    rates = ("transfer", "truth_transfer", "round_trip_transfer") if ceilings else ("transfer",)
    by_distribution = {}
    for name in sorted({s["distribution"] for s in samples}):
        group = [s for s in samples if s["distribution"] == name]
        by_distribution[name] = {"count": len(group)}
        for rate in rates:
            by_distribution[name][f"{rate}_rate"] = float(np.mean([s[rate] for s in group]))
    report = {
        "weights": str(weights),
        "data": str(data),
        "count": len(samples),
        "seed": seed,
        "steps": steps or model.settings.steps,
        "transfer_rate": float(np.mean([s["transfer"] for s in samples])),
        **{f"{rate}_rate": float(np.mean([s[rate] for s in samples])) for rate in rates[1:]},
        "by_distribution": by_distribution,
        "seconds": round(time.time() - started, 1),
        "samples": samples,
    }
    if contact_sheet:
        import io

        buffer = io.BytesIO()
        make_contact_sheet(rows, labels).save(buffer, format="PNG", optimize=True)
        atomic_write_bytes(contact_sheet, buffer.getvalue())
    if out_json:
        atomic_write_text(out_json, json.dumps(report, indent=2) + "\n")
    return report
