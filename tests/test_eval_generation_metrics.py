"""Revised transfer figure (hand-computed) and diversity IL with the 1 - SSIM substitute."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from unidg.train.evaluation.generation_metrics import (
    colour_carrying,
    intra_cluster_distance,
    revised_transfer,
    ssim_distance,
)

ROOT = Path(__file__).resolve().parents[1]


def _samples(outcomes: list[tuple[str, bool, bool, bool]]) -> tuple[list[dict], dict[str, str]]:
    samples, types = [], {}
    for index, (defect, transfer, truth, round_trip) in enumerate(outcomes):
        samples.append(
            {"reference": f"r{index}", "transfer": transfer, "truth_transfer": truth, "round_trip_transfer": round_trip}
        )
        types[f"r{index}"] = defect
    return samples, types


def test_revised_transfer_keeps_colour_carrying_pairs_and_divides_by_the_round_trip_ceiling() -> None:
    # 4 stains: model passes 2, round trip passes 4 -> 0.5; 2 dents (shading) and 1 combined are left out.
    outcomes = [("stain", True, True, True), ("stain", True, True, True), ("rust", False, True, True)]
    outcomes += [("rust", False, False, True), ("dent", True, False, False), ("blur", False, False, False)]
    outcomes += [("combined", True, True, True)]
    samples, types = _samples(outcomes)
    figure = revised_transfer(samples, types, min_pairs=4)
    assert figure["pairs"] == 4 and figure["excluded_pairs"] == 3
    assert figure["transfer_rate"] == pytest.approx(0.5) and figure["round_trip_ceiling"] == pytest.approx(1.0)
    assert figure["truth_rate"] == pytest.approx(0.75)
    assert figure["relative_transfer"] == pytest.approx(0.5)
    assert figure["transfer_rate_se"] == pytest.approx(math.sqrt(0.25 / 4))
    assert figure["relative_transfer_se"] == pytest.approx(0.5 * math.sqrt((0.25 / 0.5) ** 2))
    with pytest.raises(ValueError, match=r"4 colour-carrying pairs of 7; .* needs >= 200: raise --count to about 350"):
        revised_transfer(samples, types)
    assert not colour_carrying("warp") and colour_carrying("scratch")


def test_intra_cluster_distance_is_zero_for_identical_samples_and_crops_to_the_region() -> None:
    rng = np.random.default_rng(0)
    image = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    other = image.copy()
    other[20:28, 20:28] = 255 - other[20:28, 20:28]
    assert intra_cluster_distance([[image, image, image]]) == pytest.approx(0.0, abs=1e-9)
    region = np.zeros((32, 32), bool)
    region[20:28, 20:28] = True
    whole = intra_cluster_distance([[image, other]])
    inside = intra_cluster_distance([[image, other]], [region])
    assert 0 < whole < inside  # the change fills the region's box but only 1/16 of the image
    assert ssim_distance(image, other) == pytest.approx(whole)
    with pytest.raises(ValueError, match=">= 2 samples"):
        intra_cluster_distance([[image]])


def test_diversity_of_the_shipped_bundle_on_two_inputs(tmp_path: Path) -> None:
    from unidg.train.evaluation.generation_metrics import diversity
    from unidg.train.procedural import synthesize

    synthesize(tmp_path / "held", count=8, seed=5, size=48, progress=False)
    report = diversity(ROOT / "runtime/assets/unidg-nano-bundle", tmp_path / "held", inputs=2, samples=2, steps=2)
    assert report["inputs"] == 2 and 0 < report["il_ssim"] <= report["il_a_ssim"] < 2
    assert "LPIPS substitute" in report["distance"]


def test_transfer_draws_only_colour_carrying_references_and_refuses_too_few_before_generating(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from unidg.cli import main
    from unidg.train.eval_nano import evaluation_pairs
    from unidg.train.evaluation.generation_metrics import reference_carries_colour
    from unidg.train.procedural import synthesize

    synthesize(tmp_path / "held", count=30, seed=5, size=32, progress=False)
    every = evaluation_pairs(tmp_path / "held", 1000, seed=0)
    kept = evaluation_pairs(tmp_path / "held", 1000, seed=0, keep=reference_carries_colour)
    assert kept and all(reference_carries_colour(pair) for pair in kept)
    assert len(kept) == sum(reference_carries_colour(pair) for pair in every) < len(every)
    # Fewer colour-carrying pairs than --min-pairs: refused with the fix named, before any model is loaded.
    args = ["eval", "transfer", "--weights", str(tmp_path / "no-such-weights"), "--data", str(tmp_path / "held")]
    assert main([*args, "--count", "500", "--min-pairs", "500"]) == 2
    error = capsys.readouterr().err
    assert f"yields {len(kept)} pairs with a colour-carrying reference" in error and "unidg data synth" in error
    assert main([*args, "--count", "10"]) == 2
    assert "--count 10 is below --min-pairs 200" in capsys.readouterr().err


def _lpips_checkpoint(path: Path, drop: str | None = None, reshape: str | None = None) -> Path:
    """A checkpoint in the documented layout with seeded random weights (non-negative lin weights, as LPIPS's)."""
    import torch
    from safetensors.torch import save_file

    from unidg.train.evaluation.lpips import expected_shapes

    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in expected_shapes().items():
        values = torch.randn(shape, generator=gen) * 0.1
        state[name] = values.abs() if name.startswith("lin") else values
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = torch.zeros(7)
    save_file(state, str(path))
    return path


def _lpips_by_hand(state: dict, a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS of Zhang et al. written out layer by layer (AlexNet features 0..11, unit-normalise, weight, average)."""
    import torch
    import torch.nn.functional as F

    def features(image: np.ndarray) -> list:
        x = torch.from_numpy(image).permute(2, 0, 1)[None].double() / 127.5 - 1
        x = (x - torch.tensor([-0.030, -0.088, -0.188]).double().view(1, 3, 1, 1)) / torch.tensor(
            [0.458, 0.448, 0.450]
        ).double().view(1, 3, 1, 1)
        w = {k: v.double() for k, v in state.items()}
        x = F.relu(F.conv2d(x, w["features.0.weight"], w["features.0.bias"], stride=4, padding=2))
        taps = [x]
        x = F.relu(F.conv2d(F.max_pool2d(x, 3, 2), w["features.3.weight"], w["features.3.bias"], padding=2))
        taps.append(x)
        x = F.max_pool2d(x, 3, 2)
        for index in (6, 8, 10):
            x = F.relu(F.conv2d(x, w[f"features.{index}.weight"], w[f"features.{index}.bias"], padding=1))
            taps.append(x)
        return taps

    total = 0.0
    for k, (fa, fb) in enumerate(zip(features(a), features(b))):
        na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        lin = state[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        total += float(((na - nb) ** 2 * lin).sum(1).mean())
    return total


def test_lpips_from_a_local_checkpoint_matches_the_formula_and_refuses_other_layouts(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from unidg.core.errors import UniDGError
    from unidg.train.evaluation.lpips import load_lpips, lpips_distance

    path = _lpips_checkpoint(tmp_path / "lpips.safetensors")
    network = load_lpips(path)
    rng = np.random.default_rng(1)
    a = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    b = a.copy()
    b[16:40, 16:40] = 255 - b[16:40, 16:40]
    assert lpips_distance(network, a, a) == 0.0
    d = lpips_distance(network, a, b)
    assert d > 0 and d == lpips_distance(network, b, a)
    assert d == pytest.approx(_lpips_by_hand(load_file(str(path)), a, b), rel=1e-6)
    # Crops below AlexNet's 31 px minimum (IL-a boxes) are resized up rather than refused.
    assert lpips_distance(network, a[30:42, 30:50], a[30:42, 30:50]) == 0.0
    assert lpips_distance(network, a[30:42, 30:50], b[30:42, 30:50]) > 0
    with pytest.raises(UniDGError, match=r"missing \['lin3.model.1.weight'\]"):
        load_lpips(_lpips_checkpoint(tmp_path / "missing.safetensors", drop="lin3.model.1.weight"))
    with pytest.raises(UniDGError, match=r"features.6.bias is \[7\], expected \[384\]"):
        load_lpips(_lpips_checkpoint(tmp_path / "shape.safetensors", reshape="features.6.bias"))
    with pytest.raises(UniDGError, match=r"unexpected \['extra'\]"):
        load_lpips(_lpips_checkpoint(tmp_path / "extra.safetensors", reshape="extra"))
    with pytest.raises(UniDGError, match="expected a local .safetensors"):
        load_lpips(tmp_path / "alex.pth")


def test_diversity_with_a_local_lpips_checkpoint(tmp_path: Path) -> None:
    from unidg.train.evaluation.generation_metrics import diversity
    from unidg.train.procedural import synthesize

    synthesize(tmp_path / "held", count=8, seed=5, size=48, progress=False)
    checkpoint = _lpips_checkpoint(tmp_path / "lpips.safetensors")
    report = diversity(
        ROOT / "runtime/assets/unidg-nano-bundle", tmp_path / "held", inputs=2, samples=2, steps=2, lpips=checkpoint
    )
    assert report["inputs"] == 2 and report["il_lpips"] > 0 and report["il_a_lpips"] > 0
    assert "il_ssim" not in report and report["distance"].startswith("LPIPS (AlexNet, local checkpoint")


def test_paired_transfer_counts_changed_pairs_over_colour_carrying_references() -> None:
    from unidg.train.evaluation.generation_metrics import paired_transfer

    def run(outcomes: list[bool]) -> list[dict]:
        return [{"reference": f"r{i}", "target": f"t{i}", "transfer": t} for i, t in enumerate(outcomes)]

    types = {"r0": "stain", "r1": "stain", "r2": "rust", "r3": "stain", "r4": "fold"}  # fold: shading, left out
    first, second = run([True, False, True, True, False]), run([True, True, False, True, True])
    paired = paired_transfer(first, second, types)
    assert (paired["pairs"], paired["gained"], paired["lost"]) == (4, 1, 1)
    assert paired["difference"] == 0.0 and paired["difference_se"] == pytest.approx(np.std([0, 1, -1, 0], ddof=1) / 2)
    with pytest.raises(ValueError, match="same pairs"):
        paired_transfer(first, second[::-1], types)


def test_transfer_with_and_without_the_bundles_gated_cache_on_the_same_pairs(tmp_path: Path, capsys) -> None:
    from unidg.cli import main
    from unidg.runtime.bundle import load_bundle
    from unidg.runtime.step_cache import bundle_step_cache, schedule_name
    from unidg.train.procedural import synthesize

    root = Path(__file__).resolve().parents[1]
    schedule = bundle_step_cache(load_bundle(root / "runtime/assets/unidg-nano-bundle"), None, None).schedule
    synthesize(tmp_path / "held", count=30, seed=5, size=32, progress=False)
    args = ["eval", "transfer", "--weights", str(root / "runtime/assets/unidg-nano"), "--data", str(tmp_path / "held")]
    args += ["--count", "2", "--min-pairs", "2", "--json", str(tmp_path / "t.json")]
    assert main([*args, "--compare-cache", schedule_name(schedule)]) == 0
    capsys.readouterr()
    figure = json.loads((tmp_path / "t.json").read_text())
    assert figure["cache"] == {"mode": "off"}
    compare = figure["compare"]
    assert compare["cache"] == {"mode": "static", "schedule": [int(v) for v in schedule]}
    assert compare["round_trip_ceiling"] == figure["round_trip_ceiling"]  # the ceilings do not depend on the cache
    paired = compare["paired"]
    assert paired["pairs"] == figure["pairs"] == 2
    assert paired["difference"] == pytest.approx(compare["transfer_rate"] - figure["transfer_rate"])
    # A schedule of the wrong length, or one that skips step 0, is refused naming the option.
    assert main([*args, "--cache", "static:0" + "1" * (len(schedule) - 1)]) == 2
    assert "--cache 'static:0" in capsys.readouterr().err
    assert main([*args, "--compare-cache", "static:11"]) == 2
    assert "--compare-cache 'static:11' has 2 entries for 28 steps" in capsys.readouterr().err
