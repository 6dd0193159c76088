"""The benchmark's report: report.json (everything), report.md (the table and a verdict), a grid of generated samples
(PNG, Pillow), and, where matplotlib is installed, metric bars per training set and ROC / PR curves (PNG)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from unidg.core.manifest import atomic_write_bytes, atomic_write_text
from unidg.train.evaluation import metrics

TITLES = {
    "rule": "(i) rule-based (cut-paste + Perlin)",
    "generated": "(ii) UniDG-generated",
    "two_stage": "(iii) two-stage: (i), then filtered (ii)",
    "real": "(iv) real defects (upper bound)",
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


def _cell(entry: dict | None) -> str:
    if not entry:
        return "n/a"
    return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        "# Downstream benchmark: does generated data help inspection?",
        "",
        f"Data: {config['data']['kind']} `{config['data']['path']}`, objects: {', '.join(report['objects'])}; "
        f"seeds {config['seeds']}; detectors at {config['detectors']['size']} px. Wall time {report['seconds']:.0f} s.",
        "",
        "Values: mean ± std over seeds (in %) of the per-object mean (binary U-Net, classifier) or of the multi-class "
        "U-Net (mIoU). n/a: the set carries no defect types (rule-based) or the split has none.",
        "",
        "| training set | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, row in report["table"].items():
        lines.append(f"| {TITLES.get(name, name)} | " + " | ".join(_cell(row.get(key)) for key in COLUMNS) + " |")
    differences = report.get("generated_minus_rule") or {}
    if differences:
        better = [COLUMNS[k] for k, v in differences.items() if v > 0]
        worse = [COLUMNS[k] for k, v in differences.items() if v <= 0]
        lines += [
            "",
            "Generated (ii) minus rule-based (i), in points: "
            + ", ".join(f"{COLUMNS[k]} {100 * v:+.1f}" for k, v in differences.items())
            + f". Generated data is ahead on {len(better)} of {len(differences)} detection metrics"
            + (f" ({', '.join(better)})" if better else "")
            + (f" and behind or equal on {', '.join(worse)}" if worse else "")
            + "; compare the differences with the seed std before reading them as an effect.",
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


def plots(out: Path, report: dict, runs: list[dict]) -> list[str]:
    """metrics.png (bars per training set) and curves.png (image-level ROC and PR per set, first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(report["table"])
    keys = [k for k in COLUMNS if any(report["table"][n].get(k) for n in names)]
    figure, axis = plt.subplots(figsize=(1.2 * len(keys) + 3, 3.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [(report["table"][name].get(k) or {}).get("mean", np.nan) for k in keys]
        errors = [(report["table"][name].get(k) or {}).get("std", 0.0) for k in keys]
        axis.bar(np.arange(len(keys)) + i * width, values, width, yerr=errors, label=TITLES.get(name, name))
    axis.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, [COLUMNS[k] for k in keys])
    axis.set_ylim(0, 1)
    axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(out / "metrics.png", buffer.getvalue())
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
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(out / "curves.png", buffer.getvalue())
    return ["metrics.png", "curves.png"]


def write_report(out: Path, report: dict, runs: list[dict], samples: list) -> None:
    if samples:
        atomic_write_bytes(out / "samples.png", _png(sample_grid(samples)))
    try:
        report["plots"] = plots(out, report, runs)
    except ModuleNotFoundError as error:
        report["plots_skipped"] = f"{error.name} is not installed (pip install matplotlib)"
    atomic_write_text(out / "report.json", json.dumps({**report, "runs": runs}, indent=1) + "\n")
    atomic_write_text(out / "report.md", markdown(report))
