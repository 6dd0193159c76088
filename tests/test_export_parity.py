"""Parity of the exported nano bundle with the torch model: per graph (onnxruntime through polygraphy, and the saved
polygraphy CLI reproduction) and over the whole 28-step synthesis against the torch reference sampler."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from export_fixtures import load_nano_model, nano_bundle, other_weights, single_thread, workspace

from unidg.cli import main
from unidg.export.parity import ParityError, check_model_matches, format_report, graph_parity, report, trajectory_parity
from unidg.runtime.bundle import GRAPH_NAMES, load_bundle


@pytest.fixture(scope="module")
def figures():
    model = load_nano_model()
    with single_thread():
        graphs = graph_parity(nano_bundle(), model, save_dir=workspace() / "polygraphy")
        trajectory = trajectory_parity(nano_bundle(), model, seed=3)
    data = report(graphs, trajectory)
    (workspace() / "parity.json").write_text(json.dumps(data, indent=2))
    print("\n" + format_report(data))  # recorded in the test log (-s) and docs/export.md
    return graphs, trajectory


def test_every_graph_matches_torch(figures):
    graphs, _ = figures
    assert set(graphs) == set(GRAPH_NAMES)
    for name, parity in graphs.items():
        assert parity.polygraphy_passed, name
        assert parity.figures.max_rel < 1e-4, (name, parity.figures)
        assert parity.figures.max_abs < 1e-4, (name, parity.figures)
        assert parity.figures.reference_max > 0.01  # the outputs are not trivially zero


def test_28_step_trajectory_matches_the_torch_sampler(figures):
    _, trajectory = figures
    assert trajectory.steps == 28
    assert trajectory.latents.max_rel < 1e-4, trajectory.latents  # step graph alone, 28 launches
    assert trajectory.latents_pipeline.max_rel < 1e-3, trajectory.latents_pipeline  # + VAE encoder, image encoder
    assert trajectory.diptych_psnr > 50 and trajectory.image_psnr > 50


def test_polygraphy_cli_reproduces_the_step_comparison(figures):
    graphs, _ = figures
    command = graphs["step"].command
    assert command and command.startswith("polygraphy run")
    polygraphy = str(Path(sys.executable).with_name("polygraphy"))
    result = subprocess.run([polygraphy, *command.split()[1:]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "PASSED" in result.stdout + result.stderr


def test_parity_refuses_a_model_the_bundle_was_not_exported_from():
    from unidg.train.model import UniDGModel
    from unidg.train.presets import get_preset

    settings = dataclasses.replace(get_preset("nano").settings, fold_text_tokens=False)
    unfolded = UniDGModel.from_preset("nano", settings=settings)
    with pytest.raises(ParityError, match="context_tokens"):
        check_model_matches(load_bundle(nano_bundle()), unfolded)
    with pytest.raises(ParityError, match="static with batch 1"):
        graph_parity(nano_bundle(), load_nano_model(), batch=2)


def test_parity_against_other_weights_fails_with_exit_1(tmp_path, capsys):
    args = ["export", "parity", "--bundle", str(nano_bundle()), "--weights", str(other_weights()), "--no-trajectory"]
    with single_thread():
        code = main(args)
    captured = capsys.readouterr()
    assert "FAIL" in captured.out
    assert code == 1 and "parity FAILED for ['step'" in captured.err and "re-export" in captured.err
