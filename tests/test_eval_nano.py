"""`unidg train eval-nano`: the transfer criterion, the ceilings and the report, on a tiny random model."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from unidg.train.eval_nano import evaluate_transfer, transfer_scores
from unidg.train.model import UniDGModel
from unidg.train.procedural import synthesize


def test_transfer_scores_measure_mean_colours_inside_the_mask() -> None:
    source = np.zeros((8, 8, 3), np.uint8)
    output = source.copy()
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    output[mask] = (200, 0, 0)
    to_reference, to_source = transfer_scores(output, source, mask, np.array([180.0, 0.0, 0.0]))
    assert to_reference == pytest.approx(20.0) and to_source == pytest.approx(200.0)


def test_evaluation_report_with_ceilings(tmp_path) -> None:
    data = tmp_path / "heldout"
    synthesize(data, 12, seed=5, size=64, progress=False)
    model = UniDGModel.from_preset("nano", seed=0)
    model.settings = dataclasses.replace(model.settings, resolution=64)
    report = evaluate_transfer(
        "random-nano",
        data,
        count=6,
        steps=2,
        model=model,
        ceilings=True,
        contact_sheet=tmp_path / "sheet.png",
        out_json=tmp_path / "report.json",
    )
    assert report["count"] == 6 and set(report["by_distribution"]) == {"defect-fill", "intra-object", "cross-object"}
    fill = report["by_distribution"]["defect-fill"]
    assert fill["truth_transfer_rate"] == 1.0  # the truth is the reference's own defect
    for sample in report["samples"]:
        assert {"transfer", "truth_transfer", "round_trip_transfer"} <= set(sample)
    rate = np.mean([s["round_trip_transfer"] for s in report["samples"]])
    assert report["round_trip_transfer_rate"] == pytest.approx(rate)
    assert json.loads((tmp_path / "report.json").read_text())["count"] == 6
    assert (tmp_path / "sheet.png").stat().st_size > 0
