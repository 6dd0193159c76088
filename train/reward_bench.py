"""``unidg eval reward-bench --reward CONFIG --bench DIR``: agreement of a reward with human scores (the paper's
UDG-Reward-Bench metric, App. E): a prediction is correct when |predicted - human| <= 0.3 on the 0-5 scale of a
rubric dimension; the accuracy of a dimension is the percentage of correct pairs.

Bench folder format: ``DIR/bench.jsonl``, one JSON object per line (paths relative to DIR):

    {"id": "p0", "reference": "p0/reference.png", "reference_mask": "p0/reference_mask.png",
     "target": "p0/target.png", "target_mask": "p0/target_mask.png",
     "source": "p0/source.png",          (optional: the unedited target, for rewards that need it)
     "category": "scratch",              (optional)
     "scores": {"Reference Adherence": 4.5, "Consistency": 4.0, "Reasonability": 3.5, "Overall Quality": 4.0}}

Masks are images whose non-zero pixels mark the region; the reference and its mask share a size, and so do the
target, its mask and the source. A reward is compared on the dimensions that both its details and the bench carry
(the Defect-Und judge reports all four); a reward that reports none of them is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unidg.core.errors import UniDGError
from unidg.core.manifest import atomic_write_text
from unidg.train.rewards import RewardInputs, build_reward, checked, load_reward_config

TOLERANCE = 0.3
INDEX = "bench.jsonl"


class BenchError(UniDGError):
    """A reward bench folder or line cannot be used; the message names it and the fix."""


def _image(folder: Path, record: dict, key: str, where: str, mask: bool = False) -> np.ndarray:
    from PIL import Image

    relative = record.get(key)
    if not isinstance(relative, str):
        raise BenchError(f"{where}: '{key}' must be a path relative to the bench folder")
    path = folder / relative
    if not path.is_file():
        raise BenchError(f"{where}: {key} {path} not found")
    with Image.open(path) as image:
        array = np.asarray(image.convert("L" if mask else "RGB"))
    return array > 0 if mask else array


def read_bench(folder: str | Path) -> list[dict]:
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        raise BenchError(f"{index} not found; a reward bench folder holds {INDEX} (see `unidg eval reward-bench -h`)")
    records = []
    for number, line in enumerate(index.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{index}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchError(f"{where}: not valid JSON ({error})") from error
        scores = record.get("scores")
        if not isinstance(scores, dict) or not scores:
            raise BenchError(f"{where}: 'scores' must map rubric dimensions to human scores in [0, 5]")
        for name, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 5:
                raise BenchError(f"{where}: score {name!r} must be a number in [0, 5] (got {value!r})")
        record["_where"] = where
        records.append(record)
    if not records:
        raise BenchError(f"{index} lists no pairs")
    return records


def pair_inputs(folder: Path, record: dict):
    where = record["_where"]
    reference = _image(folder, record, "reference", where)
    reference_mask = _image(folder, record, "reference_mask", where, mask=True)
    target = _image(folder, record, "target", where)
    target_mask = _image(folder, record, "target_mask", where, mask=True)
    source = _image(folder, record, "source", where) if "source" in record else None
    if reference_mask.shape != reference.shape[:2] or target_mask.shape != target.shape[:2]:
        raise BenchError(f"{where}: each mask must have its image's size")
    if source is not None and source.shape != target.shape:
        raise BenchError(f"{where}: source must have the target's size")
    return RewardInputs(
        reference[None],
        reference_mask[None],
        target[None],
        target_mask[None],
        None if source is None else source[None],
        categories=[str(record.get("category", ""))],
        ids=[str(record.get("id", where))],
    )


def agreement(predicted: dict[str, list[float]], human: dict[str, list[float]], tolerance: float = TOLERANCE) -> dict:
    """Per-dimension accuracy (%) of predictions within ``tolerance`` of the human score."""
    accuracy = {}
    for name in predicted:
        p, h = np.asarray(predicted[name], dtype=np.float64), np.asarray(human[name], dtype=np.float64)
        accuracy[name] = round(100.0 * float(np.mean(np.abs(p - h) <= tolerance + 1e-9)), 2)
    return accuracy


def run_reward_bench(reward_config: str | Path, bench: str | Path, out_json: str | Path | None = None) -> dict:
    folder = Path(bench)
    records = read_bench(folder)
    reward = build_reward(load_reward_config(reward_config))
    predicted: dict[str, list[float]] = {}
    human: dict[str, list[float]] = {}
    rows = []
    try:
        for record in records:
            inputs = pair_inputs(folder, record)
            output = checked(reward.name, reward.score(inputs), inputs)
            common = [name for name in record["scores"] if name in output.details]
            if not common:
                raise BenchError(
                    f"{record['_where']}: the reward reports {sorted(output.details)}, the bench scores "
                    f"{sorted(record['scores'])}: no dimension to compare (use a reward with the [judge] term)"
                )
            row = {"id": inputs.ids[0], "reward": float(output.scores[0])}
            for name in common:
                predicted.setdefault(name, []).append(float(output.details[name][0]))
                human.setdefault(name, []).append(float(record["scores"][name]))
                row[name] = {"predicted": predicted[name][-1], "human": human[name][-1]}
            rows.append(row)
    finally:
        reward.close()
    counts = {name: len(values) for name, values in predicted.items()}
    accuracy = agreement(predicted, human)
    report = {
        "pairs": len(records),
        "tolerance": TOLERANCE,
        "accuracy": accuracy,
        "mean_accuracy": round(float(np.mean(list(accuracy.values()))), 2),
        "pairs_per_dimension": counts,
    }
    if out_json:
        atomic_write_text(Path(out_json), json.dumps({**report, "rows": rows}, indent=2) + "\n")
    return report
