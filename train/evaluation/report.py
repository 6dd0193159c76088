"""The benchmark's report: report.json (everything but the bootstrap replicates), report.md (the table with seed std
and bootstrap intervals, the differences between sets with paired intervals, a table per object, and a line saying
when the config is too small to mean anything), a grid of generated samples (PNG, Pillow), and, with matplotlib,
metrics.png (bars with interval whiskers per metric, in % as the table) and ROC / PR curves (PNG)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from unidg.core.manifest import atomic_write_bytes, atomic_write_text
from unidg.core.markdown import table_head
from unidg.train.evaluation import metrics

TITLES = {
    "rule": "(i) rule-based (cut-paste + Perlin)",
    "generated": "(ii) UniDG-generated",
    "two_stage": "(iii) two-stage: (i), then filtered (ii)",
    "real": "(iv) real defects (upper bound)",
    "selected": "(v) category-consistent (ii) + multi-task discriminator",
    "compare": "(ii') (ii)'s requests, compare arm",
}
COLUMNS = {
    "auroc_i": "AUROC-I",
    "ap_i": "AP-I",
    "auroc_p": "AUROC-P",
    "ap_p": "AP-P",
    "pro": "PRO",
    "accuracy": "Acc",
    "miou": "mIoU",
    "bg_miou": "BG-mIoU",
    "fg_miou": "FG-mIoU",
}


SHORT = {
    "rule": "(i)",
    "generated": "(ii)",
    "two_stage": "(iii)",
    "real": "(iv)",
    "selected": "(v)",
    "compare": "(ii')",
}
OBJECT_COLUMNS = ("auroc_i", "ap_i", "auroc_p", "ap_p", "pro", "accuracy")


def _short(name: str) -> str:
    return SHORT.get(name, name)


def _cell(entry: dict | None) -> str:
    if not entry:
        return "n/a"
    text = f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"
    if "low" in entry:
        text += f" [{100 * entry['low']:.1f}, {100 * entry['high']:.1f}]"
    return text


def _difference_cell(value: dict | None) -> str:
    if not value:
        return "n/a"
    text = f"{100 * value['difference']:+.1f}"
    if "low" in value:
        text += f" [{100 * value['low']:+.1f}, {100 * value['high']:+.1f}]" + (" *" if value["resolved"] else "")
    if value.get("seeds_agree") is False:
        text += " †"
    return text


def _table(rows: dict, keys) -> list[str]:
    lines = table_head("training set", *(COLUMNS[k] for k in keys))
    for name, row in rows.items():
        lines.append(f"| {TITLES.get(name, name)} | " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    return lines


def _generation_arms(config: dict) -> list[str]:
    """What generated (ii) and the compare arm (ii'), when the report has one: the two differ only there."""
    if "compare" not in config.get("sets", ()):
        return []
    generation = config["generation"]
    label = generation.get("compare_label") or "compare arm"

    def arm(bundle: str, cache: str) -> str:
        return f"bundle `{bundle}`, step cache {cache or 'the bundle default'}"

    compare_bundle = generation.get("compare_bundle") or generation["bundle"]
    return [
        "",
        f"(ii) {arm(generation['bundle'], generation.get('cache', ''))}; (ii') {label}: "
        f"{arm(compare_bundle, generation.get('compare_cache', ''))}. Both ran the same requests (sources, "
        "references, regions, seeds), so (ii') − (ii) is paired image by image.",
    ]


def markdown(report: dict) -> str:
    config = report["config"]
    confidence = config.get("report", {}).get("confidence", 0.95)
    replicates = config.get("report", {}).get("bootstrap", 0)
    level = f"{100 * confidence:.0f} %"
    lines = [
        "# Downstream benchmark: does generated data help inspection?",
        "",
        f"Data: {config['data']['kind']} `{config['data']['path']}`, objects: {', '.join(report['objects'])}; "
        f"seeds {config['seeds']}; detectors at {config['detectors']['size']} px. Wall time {report['seconds']:.0f} s.",
        "",
    ]
    if report.get("adequacy"):
        lines += ["**Too small to mean anything:** " + "; ".join(report["adequacy"]) + ".", ""]
    lines += [
        "Values in %: mean ± std over seeds of the per-object mean (binary U-Net, classifier) or of the multi-class "
        f"U-Net (mIoU), then [the {level} bootstrap interval over test images ({replicates} redraws of each "
        "object's good and defective test images, the trained detectors fixed)]. n/a: the set carries no defect "
        "types (rule-based) or the split has none.",
        "",
        *_table(report["table"], list(COLUMNS)),
        *_generation_arms(config),
    ]
    differences = report.get("differences") or []
    if differences:
        keys = [k for k in COLUMNS if any(k in d["metrics"] for d in differences)]
        lines += [
            "",
            f"## Differences between sets, in points [{level} paired bootstrap interval]",
            "",
            "Both sets scored on the same redrawn test images. * : the interval excludes zero. † : the seeds disagree "
            "on the sign (per-seed differences in report.json): the difference is within the detectors' training "
            "noise, which the interval does not carry.",
            "",
            *table_head("difference", *(COLUMNS[k] for k in keys)),
        ]
        for entry in differences:
            label = f"{_short(entry['minuend'])} − {_short(entry['subtrahend'])}"
            lines.append(f"| {label} | " + " | ".join(_difference_cell(entry["metrics"].get(k)) for k in keys) + " |")
    if report.get("per_object"):
        lines += ["", "## Per object", ""]
        for name, rows in report["per_object"].items():
            tests = report.get("test_images", {}).get(name)
            lines += [
                f"**{name}**" + (f" ({tests} test images)" if tests else ""),
                "",
                *_table(rows, OBJECT_COLUMNS),
                "",
            ]
    lines += ["", "Files: report.json (every run), samples.png (generated training images)"]
    if report.get("plots"):
        lines.append(", ".join(report["plots"]))
    elif report.get("plots_skipped"):
        lines.append(f"Plots not drawn: {report['plots_skipped']}")
    return "\n".join(lines) + "\n"


def sample_grid(samples: list[tuple[np.ndarray, np.ndarray, str]], cell: int = 96, columns: int = 4) -> Image.Image:
    """Generated images with the target region outlined in red, captioned object: defect type."""
    rows = max(1, -(-len(samples) // columns))
    sheet = Image.new("RGB", (columns * (cell + 4) + 4, rows * (cell + 18) + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for n, (image, mask, label) in enumerate(samples):
        outlined = image.copy()
        edge = mask & ~np.pad(mask, 1)[2:, 1:-1] | mask & ~np.pad(mask, 1)[:-2, 1:-1]
        edge |= mask & ~np.pad(mask, 1)[1:-1, 2:] | mask & ~np.pad(mask, 1)[1:-1, :-2]
        outlined[edge] = (255, 0, 0)
        tile = Image.fromarray(outlined).resize((cell, cell), Image.Resampling.NEAREST)
        x, y = 4 + (n % columns) * (cell + 4), 4 + (n // columns) * (cell + 18)
        sheet.paste(tile, (x, y + 14))
        draw.text((x, y), label[:22], fill="black")
    return sheet


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _write_figure(figure, path: Path) -> None:
    """Lay ``figure`` out, write it as a PNG (atomically) and close it."""
    from matplotlib import pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def _whiskers(entries: list[dict | None], value_key: str) -> tuple[list[float], list[float], list[float]]:
    """Bar heights, whisker centres and half-lengths in %: the whisker spans the bootstrap interval exactly (which
    need not be centred on the bar: the redrawn figures can be skewed), else mean +- the seed std."""
    values, centres, halves = [], [], []
    for entry in entries:
        if not entry:
            values.append(np.nan)
            centres.append(np.nan)
            halves.append(0.0)
            continue
        value = 100 * entry[value_key]
        values.append(value)
        if "low" in entry:
            centres.append(50 * (entry["low"] + entry["high"]))
            halves.append(50 * (entry["high"] - entry["low"]))
        else:
            centres.append(value)
            halves.append(100 * entry.get("std", 0.0))
    return values, centres, halves


def plots(out: Path, report: dict, runs: list[dict]) -> list[str]:
    """metrics.png (per metric: a bar per training set with its interval, and each set's difference from the
    first with its paired interval; in %, the table's scale) and curves.png (image-level ROC and PR, first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(report["table"])
    keys = [k for k in COLUMNS if any(report["table"][n].get(k) for n in names)]
    base = names[0]
    against = [d for d in report.get("differences", []) if d["subtrahend"] == base]
    figure, axes = plt.subplots(1, 2 if against else 1, figsize=(2.4 * len(keys) + 4, 4), squeeze=False)
    axis = axes[0][0]
    width = 0.8 / max(1, len(names))
    x = np.arange(len(keys))
    for i, name in enumerate(names):
        values, centres, halves = _whiskers([report["table"][name].get(k) for k in keys], "mean")
        axis.bar(x + i * width, values, width, label=TITLES.get(name, name), color=f"C{i}")
        axis.errorbar(x + i * width, centres, yerr=halves, fmt="none", capsize=2, color="black", linewidth=0.8)
    axis.set_xticks(x + 0.4 - width / 2, [COLUMNS[k] for k in keys])
    axis.set_ylim(0, 100)
    axis.set_ylabel("%")
    axis.set_title("mean over seeds; whiskers: bootstrap interval over test images", fontsize=8)
    axis.legend(fontsize=7)
    if against:
        axis = axes[0][1]
        width = 0.8 / len(against)
        for i, entry in enumerate(against):
            values, centres, halves = _whiskers([entry["metrics"].get(k) for k in keys], "difference")
            name = entry["minuend"]
            label = f"{_short(name)} − {_short(base)}"
            axis.bar(x + i * width, values, width, label=label, color=f"C{names.index(name)}")
            axis.errorbar(x + i * width, centres, yerr=halves, fmt="none", capsize=2, color="black", linewidth=0.8)
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xticks(x + 0.4 - width / 2, [COLUMNS[k] for k in keys])
        axis.set_ylabel("points (%)")
        axis.set_title(f"difference from {TITLES.get(base, base)}; whiskers: paired interval", fontsize=8)
        axis.legend(fontsize=7)
    _write_figure(figure, out / "metrics.png")
    figure, (roc_axis, pr_axis) = plt.subplots(1, 2, figsize=(8, 3.5))
    first_seed = report["config"]["seeds"][0]
    for name in names:
        labels, scores = [], []
        for run in runs:
            if run["set"] == name and run["seed"] == first_seed and "curve" in run:
                labels += run["curve"]["labels"]
                scores += run["curve"]["scores"]
        if len(set(labels)) < 2:
            continue
        fpr, tpr, _ = metrics.roc_curve(np.array(labels), np.array(scores))
        precision, recall, _ = metrics.precision_recall_curve(np.array(labels), np.array(scores))
        roc_axis.plot(fpr, tpr, label=TITLES.get(name, name))
        pr_axis.step(recall, precision, where="post", label=TITLES.get(name, name))
    roc_axis.set(xlabel="false-positive rate", ylabel="true-positive rate", title="image-level ROC (pooled objects)")
    pr_axis.set(xlabel="recall", ylabel="precision", title="image-level PR (pooled objects)")
    roc_axis.legend(fontsize=6)
    _write_figure(figure, out / "curves.png")
    return ["metrics.png", "curves.png"]


def write_report(out: Path, report: dict, runs: list[dict], samples: list) -> None:
    if samples:
        atomic_write_bytes(out / "samples.png", _png(sample_grid(samples)))
    try:
        report["plots"] = plots(out, report, runs)
    except ModuleNotFoundError as error:
        report["plots_skipped"] = f"{error.name} is not installed (pip install matplotlib)"
    # The replicates stay in the cache (OUTPUT/cache/results): report.json keeps every run's own figures.
    light = [{k: v for k, v in run.items() if k != "bootstrap"} for run in runs]
    atomic_write_text(out / "report.json", json.dumps({**report, "runs": light}, indent=1) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
