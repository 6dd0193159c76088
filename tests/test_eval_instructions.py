"""``unidg eval instructions``: the different-category pairing, the paired statistics, the region classifier (its
features see only the pixels inside the region, never its shape; its training), and runs on a tiny UniDG-Text bundle
with a tiny Defect-Recog classifier and with the region classifier (report contents consistent with its own samples,
seeds independent of each other, bad inputs refused by name)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from text_fixtures import tiny_text_weights
from train_fixtures import procedural_udg

from unidg.cli import main
from unidg.core.errors import OptionError, UniDGError
from unidg.core.instructions import drawn_attributes, instruction, no_reference_instruction
from unidg.core.udg import read_index
from unidg.export.bundle import export_bundle
from unidg.train.evaluation import instruction_agreement
from unidg.train.evaluation.instruction_agreement import (
    different_category_partners,
    paired_summary,
    parse_seeds,
    summarize,
)
from unidg.train.evaluation.region_classifier import (
    FEATURES,
    RegionClassifier,
    region_features,
    train_region_classifier,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 21 categories of 1-6 quadruplets, as in the nano held-out folder.
HELDOUT_LIKE = [f"c{k}" for k, size in enumerate([6] * 6 + [5] * 7 + [4] * 7 + [1]) for _ in range(size)]


def _check_partners(categories: list[str], partners: list[int]) -> None:
    assert sorted(partners) == list(range(len(categories)))  # a permutation: every instruction crossed once
    assert all(categories[j] != categories[i] for i, j in enumerate(partners))


def test_partners_are_a_seeded_permutation_of_other_categories() -> None:
    first = different_category_partners(HELDOUT_LIKE, seed=0)
    _check_partners(HELDOUT_LIKE, first)
    assert different_category_partners(HELDOUT_LIKE, seed=0) == first
    assert different_category_partners(HELDOUT_LIKE, seed=1) != first


def test_partners_exist_up_to_half_of_one_category(monkeypatch) -> None:
    halves = ["a"] * 6 + ["b"] * 3 + ["c"] * 3  # few valid permutations: the construction takes over
    _check_partners(halves, different_category_partners(halves, seed=4))
    monkeypatch.setattr(instruction_agreement, "DERANGEMENT_TRIES", 0)  # the construction alone
    for categories in (halves, HELDOUT_LIKE, ["a", "b"]):
        _check_partners(categories, different_category_partners(categories, seed=2))
    with pytest.raises(UniDGError, match="more than half.*--limit"):
        different_category_partners(["a", "a", "b"], seed=0)


def test_paired_summary_by_hand() -> None:
    summary = paired_summary(
        matched=np.array([1.0, 0.5, 0.0, 1.0]),
        crossed=np.array([0.0, 0.5, 0.0, 0.0]),
        accuracy=np.array([1.0, 1.0, 0.0, 0.0]),
        accuracy_crossed=np.array([0.0, 1.0, 0.0, 0.0]),
        normal=np.array([0.0, 0.5, 1.0, 0.0]),
    )
    assert summary["matched_rate"] == pytest.approx(0.625) and summary["crossed_rate"] == pytest.approx(0.125)
    assert summary["difference"] == pytest.approx(0.5)
    assert summary["difference_se"] == pytest.approx(np.std([1, 0, 0, 1], ddof=1) / 2)
    assert summary["matched_se"] == pytest.approx(np.std([1, 0.5, 0, 1], ddof=1) / 2)
    assert summary["accuracy_se"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert summary["accuracy_crossed"] == pytest.approx(0.25) and summary["accuracy_crossed_se"] == pytest.approx(0.25)
    low, high = summary["difference_ci95"]
    assert 0.0 <= low < 0.5 < high <= 1.0
    assert (summary["matched_above_crossed"], summary["crossed_above_matched"]) == (2, 0)
    assert summary["normal_share"] == pytest.approx(0.375)


def _sample(seed: int, qid: str, own: str, other: str, predicted_own: str, predicted_crossed: str) -> dict:
    return {
        "seed": seed,
        "id": qid,
        "category": own,
        "partner_category": other,
        "predicted_own": predicted_own,
        "predicted_crossed": predicted_crossed,
        "top_own": predicted_own,
        "top_crossed": "normal",
        "region_change": 1.0,
        "attributes_dropped": 0,
    }


def test_an_ignored_instruction_scores_matched_equal_to_crossed() -> None:
    """Same prediction under both instructions (what a generator ignoring them gives): the difference is 0 per
    quadruplet, however often the prediction hits the true category."""
    samples = [
        _sample(0, "q0", "hole", "rust", "hole", "hole"),
        _sample(0, "q1", "rust", "glue", "glue", "glue"),
        _sample(0, "q2", "glue", "hole", "dirt", "dirt"),
    ]
    summary = summarize(samples)
    assert summary["difference"] == 0.0 and summary["difference_se"] == 0.0
    assert summary["matched_rate"] == summary["crossed_rate"] == pytest.approx(1 / 3)
    assert summary["accuracy"] == summary["accuracy_crossed"] == pytest.approx(1 / 3)
    assert summary["same_prediction"] == 1.0


def test_pooling_averages_a_quadruplets_seeds_first() -> None:
    samples = [
        _sample(0, "q0", "hole", "rust", "hole", "rust"),  # matched 1, crossed 0
        _sample(1, "q0", "hole", "glue", "glue", "hole"),  # matched 0, crossed 1
        _sample(0, "q1", "rust", "hole", "rust", "hole"),  # matched 1, crossed 0
        _sample(1, "q1", "rust", "glue", "rust", "dirt"),  # matched 0.5, crossed 0
    ]
    summary = summarize(samples)
    assert summary["quadruplets"] == 2 and summary["generations"] == 8
    assert summary["matched_rate"] == pytest.approx((0.5 + 0.75) / 2)
    assert summary["crossed_rate"] == pytest.approx((0.5 + 0.0) / 2)
    assert summary["difference_se"] == pytest.approx(np.std([0.0, 0.75], ddof=1) / math.sqrt(2))


# ------------------------------------------------------------------------------------------ the region classifier
def _scene(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 16 px normal image, an abnormal one with a reddish defect in a 4 x 4 square, and that square."""
    rng = np.random.default_rng(seed)
    normal = rng.integers(60, 120, size=(16, 16, 3), dtype=np.uint8)
    region = np.zeros((16, 16), bool)
    region[4:8, 6:10] = True
    abnormal = normal.copy()
    abnormal[region] = np.clip(abnormal[region] + rng.integers(0, 90, size=(16, 3)) * [1, 0, 0], 0, 255)
    return abnormal, normal, region


def test_region_features_see_the_region_pixels_not_its_shape() -> None:
    abnormal, normal, region = _scene(0)
    features = region_features(abnormal, normal, region, size=16)
    assert features.shape == (FEATURES,)
    outside = ~region
    repainted = abnormal.copy()
    repainted[outside] = 255 - repainted[outside]  # other pixels outside the region change nothing
    assert np.array_equal(region_features(repainted, normal, region, size=16), features)
    # The same pixel values (abnormal and normal together) moved into a 2 x 8 strip, in another order: same features.
    strip = np.zeros_like(region)
    strip[10:12, 2:10] = True
    order = np.random.default_rng(1).permutation(int(region.sum()))
    moved_abnormal, moved_normal = abnormal.copy(), normal.copy()
    moved_abnormal[strip], moved_normal[strip] = abnormal[region][order], normal[region][order]
    assert np.allclose(region_features(moved_abnormal, moved_normal, strip, size=16), features)
    # What changed inside the region shows: a red-only change has a positive mean red change and no green one.
    change_means = features[15:18]  # (A - N) mean per channel: after A's 5 statistics x 3 channels
    assert change_means[0] > 0.05 and change_means[1] == change_means[2] == 0.0
    assert not np.allclose(region_features(normal, normal, region, size=16), features)


def test_region_classifier_is_deterministic_and_separates_colours() -> None:
    """Red-changed defects against blue-changed ones: learned exactly, the same weights twice."""
    red = [region_features(*_scene(seed), size=16) for seed in range(6)]
    blue = []
    for seed in range(6):
        abnormal, normal, region = _scene(seed)
        blue.append(region_features(abnormal[..., ::-1].copy(), normal[..., ::-1].copy(), region, size=16))
    features, categories = np.stack(red + blue), ["rust"] * 6 + ["hole"] * 6
    model = RegionClassifier.fit(features, categories)
    assert model.predict(features) == categories
    again = RegionClassifier.fit(features, categories)
    assert np.array_equal(model.weight, again.weight) and np.array_equal(model.bias, again.bias)
    with pytest.raises(UniDGError, match="at least 2 categories"):
        RegionClassifier.fit(features[:6], categories[:6])


def test_region_classifier_trains_on_a_udg_folder(udg: Path, tmp_path: Path) -> None:
    model, training = train_region_classifier(udg, size=32, kernel=7, iterations=2)
    assert training["quadruplets"] == 8 and training["categories"] == ["bruise", "missing"]
    assert training["train_accuracy"] == 1.0  # 8 quadruplets, 36 features: separable
    assert set(model.predict(np.zeros((3, FEATURES)))) <= {"bruise", "missing"}
    with pytest.raises(UniDGError, match="--train-data.*index.jsonl"):
        train_region_classifier(tmp_path, size=32, kernel=7, iterations=2)


def test_seeds_are_parsed_and_refused_by_name() -> None:
    assert parse_seeds("0,1,2") == [0, 1, 2] and parse_seeds("7") == [7]
    for bad in ("a", "1,1", "-1", ""):
        with pytest.raises(OptionError, match="--seeds"):
            parse_seeds(bad)


# ------------------------------------------------------------------------------------------------ one real run
@pytest.fixture(scope="module")
def udg(tmp_path_factory) -> Path:
    folder = procedural_udg(tmp_path_factory, 8, seed=0)  # 4 'missing', then 4 'bruise'
    assert Counter(q.category for q in read_index(folder)) == {"missing": 4, "bruise": 4}
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny UniDG-Text bundle (S = 32, K = 32: attribute words get dropped to fit)."""
    folder = tmp_path_factory.mktemp("text")
    export_bundle(tiny_text_weights(folder, text_tokens=32), folder / "bundle", progress=None)
    return folder / "bundle"


@pytest.fixture(scope="module")
def recog(tmp_path_factory, udg: Path) -> Path:
    out = tmp_path_factory.mktemp("recog") / "reward"
    args = ["--size", "32", "--epochs", "1", "--batch", "8", "--resnet-width", "8", "--unet-width", "4"]
    assert main(["train", "reward-recog", "--data", str(udg), "--out", str(out), *args]) == 0
    return out


def _command(bundle: Path, udg: Path, recog: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "instructions", "--bundle", str(bundle), "--data", str(udg), "--classifier", "recog"] + [
        "--recog",
        str(recog),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def report(tmp_path_factory, bundle: Path, udg: Path, recog: Path) -> dict:
    out = tmp_path_factory.mktemp("instructions") / "report"
    assert main(_command(bundle, udg, recog, out, "--seeds", "0,1")) == 0
    assert (out / "report.md").read_text().startswith("# Instruction agreement")
    return json.loads((out / "report.json").read_text())


def test_report_follows_from_its_samples(report: dict, udg: Path) -> None:
    quadruplets = {q.id: q for q in read_index(udg)}
    assert report["quadruplets"] == 8 and report["seeds"] == [0, 1] and report["generations"] == 32
    assert len(report["samples"]) == 16 and set(report["per_seed"]) == {"0", "1"}
    for seed in (0, 1):
        samples = [s for s in report["samples"] if s["seed"] == seed]
        assert sorted(s["partner"] for s in samples) == sorted(quadruplets)  # every instruction crossed once
        own = {s["id"]: s["instruction"] for s in samples}
        for s in samples:
            q = quadruplets[s["id"]]
            assert s["partner_category"] != s["category"] == q.category
            assert s["crossed_instruction"] == own[s["partner"]]  # B_i is the partner's own instruction
            drawn = drawn_attributes(q.caption, seed, q.id)
            kept = drawn[: len(drawn) - s["attributes_dropped"]]
            assert s["instruction"] == no_reference_instruction(q.category, kept)
            if not s["attributes_dropped"]:
                assert s["instruction"] == instruction(
                    q.caption, q.category, with_reference=False, seed=seed, sample_id=q.id
                )
        assert report["per_seed"][str(seed)] == summarize(samples)
    assert report["pooled"] == summarize(report["samples"])
    pooled = report["pooled"]
    assert 0.0 <= pooled["crossed_rate"] <= 1.0 and 0.0 <= pooled["matched_rate"] <= 1.0
    assert pooled["region_change"] > 0.0  # the instruction reaches the image
    assert 0 < pooled["shortened_instructions"] < 16  # K = 32 holds some attribute words, not all


def test_a_seed_is_the_same_alone(tmp_path: Path, report: dict, bundle: Path, udg: Path, recog: Path) -> None:
    assert main(_command(bundle, udg, recog, tmp_path / "one", "--seeds", "1")) == 0
    alone = json.loads((tmp_path / "one" / "report.json").read_text())
    assert alone["samples"] == [s for s in report["samples"] if s["seed"] == 1]


def test_bad_inputs_are_refused_by_name(tmp_path: Path, bundle: Path, udg: Path, recog: Path, toy, capsys) -> None:
    def refused(command: list[str], *words: str) -> None:
        assert main(command) == 2
        error = capsys.readouterr().err
        assert all(word in error for word in words), error

    refused(_command(toy, udg, recog, tmp_path / "a"), str(toy), "reference-mode bundle", "unidg train text")
    refused(_command(bundle, udg, tmp_path / "none", tmp_path / "b"), "--recog", "unidg train reward-recog")
    refused(_command(bundle, udg, udg, tmp_path / "c"), "--recog", "recog.json")
    refused(_command(bundle, udg, recog, tmp_path / "d", "--limit", "4"), "more than half", "--limit")
    refused(_command(bundle, udg, recog, tmp_path / "e", "--seeds", "x"), "--seeds")
    refused(_command(bundle, udg, recog, tmp_path / "e", "--threads", "0"), "--threads")
    assert not any(tmp_path.glob("[a-e]"))  # nothing written before the refusal
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    refused(_command(bundle, udg, recog, tmp_path / "full"), "already holds files")


def _region_command(bundle: Path, udg: Path, out: Path, *extra: str) -> list[str]:
    return ["eval", "instructions", "--bundle", str(bundle), "--data", str(udg), "--out", str(out), "--quiet", *extra]


def test_the_region_classifier_is_the_default(tmp_path: Path, bundle: Path, udg: Path) -> None:
    out = tmp_path / "region"
    assert main(_region_command(bundle, udg, out, "--train-data", str(udg), "--seeds", "0")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["classifier"] == "region" and report["recog"] is None
    assert report["region_classifier"]["quadruplets"] == 8 and report["untrained_categories"] == []
    assert report["real_accuracy"] == 1.0  # its own training quadruplets, learned exactly
    assert report["pooled"] == summarize(report["samples"]) and report["generations"] == 16
    assert all(s["top_own"] is None and s["predicted_own"] in {"bruise", "missing"} for s in report["samples"])
    assert report["pooled"]["normal_share"] == 0.0
    markdown = (out / "report.md").read_text()
    assert "region statistics" in markdown and "| — |" in markdown


def test_classifier_options_are_refused_by_name(tmp_path: Path, bundle: Path, udg: Path, recog: Path, capsys) -> None:
    def refused(extra: list[str], *words: str) -> None:
        assert main(_region_command(bundle, udg, tmp_path / "out", *extra)) == 2
        error = capsys.readouterr().err
        assert all(word in error for word in words), error

    refused([], "--classifier region", "--train-data DIR", "--classifier recog")
    refused(["--train-data", str(udg), "--recog", str(recog)], "--recog is read only with --classifier recog")
    refused(["--classifier", "recog"], "--classifier recog needs --recog")
    refused(["--classifier", "recog", "--recog", str(recog), "--train-data", str(udg)], "--train-data is read only")
    refused(["--train-data", str(tmp_path)], "--train-data", "index.jsonl")
    assert not (tmp_path / "out").exists()
