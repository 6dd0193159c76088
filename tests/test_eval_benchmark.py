"""``unidg eval run``: rule-based defects, retrieval filter, config errors, and the tiny config end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from unidg.cli import main
from unidg.train.config import ConfigError
from unidg.train.evaluation.config import load_eval_config
from unidg.train.evaluation.rule_defects import cut_paste, perlin_anomaly
from unidg.train.evaluation.training_sets import LabelledSet, retrieval_filter

ROOT = Path(__file__).resolve().parents[1]


def _image(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((40, 48, 3)) * 255).astype(np.uint8)


def test_rule_defects_change_only_their_mask_and_are_deterministic() -> None:
    image, texture = _image(0), _image(1)[:10, :13]
    for make in (lambda rng: cut_paste(image, rng), lambda rng: perlin_anomaly(image, texture, rng)):
        out, mask = make(np.random.default_rng(4))
        again, again_mask = make(np.random.default_rng(4))
        assert mask.any() and not mask.all() and out.dtype == np.uint8
        np.testing.assert_array_equal(out[~mask], image[~mask])
        assert (out[mask] != image[mask]).any()
        np.testing.assert_array_equal(out, again)
        np.testing.assert_array_equal(mask, again_mask)


def test_retrieval_filter_keeps_the_images_closest_to_their_type_references() -> None:
    mask = np.zeros((2, 8, 8), bool)
    mask[:, 2:6, 2:6] = True
    red, blue = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)
    red[..., 0], blue[..., 2] = 200, 200
    references = LabelledSet(np.stack([red, blue]), mask, ["stain", "rust"])
    # Generated: a red stain (matches), a blue stain (wrong colour for its type), a blue rust (matches).
    generated = LabelledSet(np.stack([red, blue, blue]), np.concatenate([mask, mask[:1]]), ["stain", "stain", "rust"])
    kept = retrieval_filter(generated, references, keep_fraction=2 / 3)
    assert kept.defects == ["stain", "rust"]
    np.testing.assert_array_equal(kept.images[0], red)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('output = "o"\nsets = ["rule", "gan"]\n[data]\npath = "d"\n')
    with pytest.raises(ConfigError, match="sets must be among rule, generated, two_stage, real"):
        load_eval_config(config)
    config.write_text('output = "o"\n[data]\npath = "d"\n[generation]\nkeep_fraction = 0.0\n')
    with pytest.raises(ConfigError, match=r"generation.keep_fraction must be in \(0, 1\]"):
        load_eval_config(config)
    assert main(["eval", "run", "--config", str(tmp_path / "absent.toml")]) == 2


def test_tiny_config_runs_end_to_end_and_resumes_from_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)  # the config's bundle path is relative to the repository root
    out = tmp_path / "eval"
    args = ["eval", "run", "--config", "configs/eval-tiny.toml", "--out", str(out), "--quiet"]
    args += ["--set", f'data.path="{tmp_path / "data"}"']
    args += ["--set", 'sets=["rule", "generated", "two_stage", "real", "selected"]']
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["table"]) == ["rule", "generated", "two_stage", "real", "selected"]
    selected = [r for r in report["runs"] if r["set"] == "selected" and r["object"] != "*"]
    generated = {r["object"]: r for r in report["runs"] if r["set"] == "generated" and r["object"] != "*"}
    for run in selected:  # the multi-task discriminator: detection metrics and a type accuracy, on fewer images
        assert 1 <= run["selected"] and run["train_images"] <= generated[run["object"]]["train_images"]
        assert 0.0 <= run["auroc_p"] <= 1.0
    for name, row in report["table"].items():
        for metric in ("auroc_i", "ap_i", "auroc_p", "ap_p", "pro"):
            assert 0.0 <= row[metric]["mean"] <= 1.0, (name, metric)
    assert report["table"]["rule"]["miou"] is None  # rule-based defects carry no defect type
    assert report["table"]["generated"]["miou"] is not None
    assert {r["object"] for r in report["runs"]} == {*report["objects"], "*"}
    markdown = (out / "report.md").read_text()
    assert "(ii) UniDG-generated" in markdown and "| (ii) − (i) |" in markdown
    assert "**Too small to mean anything:** one seed" in markdown  # the tiny config is one seed
    for name, row in report["table"].items():
        entry = row["auroc_p"]
        assert entry["low"] <= entry["high"] and 0.0 <= entry["low"] <= 1.0, name
    generated_minus_rule = next(
        d for d in report["differences"] if (d["minuend"], d["subtrahend"]) == ("generated", "rule")
    )["metrics"]["pro"]
    expected = report["table"]["generated"]["pro"]["mean"] - report["table"]["rule"]["pro"]["mean"]
    assert generated_minus_rule["difference"] == pytest.approx(expected)
    assert "bootstrap" not in report["runs"][0]  # replicates stay in the cache
    assert (out / "samples.png").stat().st_size > 0
    models = sorted((out / "cache" / "models").iterdir())
    stamps = [p.stat().st_mtime_ns for p in models]
    assert models and list((out / "cache" / "generated").iterdir())
    # A rerun finds every detector and score in the cache: nothing is retrained, the table is the same.
    assert main(args) == 0
    assert [p.stat().st_mtime_ns for p in sorted((out / "cache" / "models").iterdir())] == stamps
    assert json.loads((out / "report.json").read_text())["table"] == report["table"]


def _report_fixture(seeds: list[int] | None = None) -> tuple[dict, list[dict]]:
    rule = {"mean": 0.8, "std": 0.1, "n": 2, "low": 0.7, "high": 0.85}
    generated = {"mean": 0.9, "std": 0.05, "n": 2, "low": 0.86, "high": 0.95}
    report = {
        "config": {
            "data": {"kind": "udg", "path": "d"},
            "seeds": seeds or [0, 1],
            "detectors": {"size": 32},
            "report": {"bootstrap": 1000, "confidence": 0.95},
        },
        "objects": ["fabric"],
        "test_images": {"fabric": 20},
        "table": {"rule": {"auroc_i": rule, "accuracy": None}, "generated": {"auroc_i": generated}},
        "per_object": {"fabric": {"rule": {"auroc_i": rule}, "generated": {"auroc_i": generated}}},
        "differences": [
            {
                "minuend": "generated",
                "subtrahend": "rule",
                "metrics": {"auroc_i": {"difference": 0.1, "low": 0.02, "high": 0.19, "resolved": True}},
            }
        ],
        "adequacy": [],
        "seconds": 12.0,
    }
    runs = [
        {"seed": 0, "object": "fabric", "set": name, "curve": {"labels": [0, 1, 0, 1], "scores": [0.1, 0.9, 0.4, 0.3]}}
        for name in ("rule", "generated")
    ]
    return report, runs


def test_report_markdown_tables_and_differences() -> None:
    from unidg.train.evaluation.report import markdown

    report, _ = _report_fixture()
    text = markdown({**report, "plots_skipped": "matplotlib is not installed (pip install matplotlib)"})
    assert "| (i) rule-based (cut-paste + Perlin) | 80.0 ± 10.0 [70.0, 85.0] | n/a |" in text
    assert "| (ii) − (i) | +10.0 [+2.0, +19.0] * |" in text
    assert "**fabric** (20 test images)" in text
    assert "Too small" not in text
    assert "Plots not drawn: matplotlib is not installed" in text
    text = markdown({**report, "adequacy": ["one seed: the spread between detector seeds is not measured"]})
    assert "**Too small to mean anything:** one seed" in text


def test_adequacy_names_one_seed_and_unresolved_differences() -> None:
    from unidg.train.evaluation.benchmark import adequacy
    from unidg.train.evaluation.config import EvalConfig

    resolved = [{"metrics": {"pro": {"difference": 0.1, "low": 0.05, "high": 0.15, "resolved": True}}}]
    unresolved = [{"metrics": {"pro": {"difference": 0.1, "low": -0.05, "high": 0.25, "resolved": False}}}]
    assert adequacy(EvalConfig(seeds=[0, 1]), resolved) == []
    reasons = adequacy(EvalConfig(seeds=[0]), unresolved)
    assert len(reasons) == 2 and reasons[0].startswith("one seed") and "contains zero" in reasons[1]


def test_plots_are_drawn_with_matplotlib(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib not installed (the train extra lists it)")
    from unidg.train.evaluation.report import _whiskers, plots

    report, runs = _report_fixture()
    assert plots(tmp_path, report, runs) == ["metrics.png", "curves.png"]
    assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # Bars and whiskers in %, the table's scale: the whisker spans the interval [70, 85] exactly, bar at 80; an
    # interval that does not hold the bar (skewed redraws) is still drawn as it is.
    values, centres, halves = _whiskers([report["table"]["rule"]["auroc_i"], None], "mean")
    assert values[0] == pytest.approx(80.0) and centres[0] - halves[0] == pytest.approx(70.0)
    assert centres[0] + halves[0] == pytest.approx(85.0) and np.isnan(values[1])
    skewed = {"mean": 0.99, "std": 0.0, "low": 0.9, "high": 0.98}
    _, centres, halves = _whiskers([skewed], "mean")
    assert halves[0] > 0 and centres[0] + halves[0] == pytest.approx(98.0)
    report["table"]["generated"]["auroc_i"] = skewed
    assert plots(tmp_path, report, runs) == ["metrics.png", "curves.png"]


def test_detector_threads_apply_during_the_run_only(tmp_path: Path, monkeypatch) -> None:
    import torch

    from unidg.train.evaluation import benchmark
    from unidg.train.evaluation.config import EvalConfig

    seen = []
    monkeypatch.setattr(benchmark, "_run_benchmark", lambda config, progress: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    config = EvalConfig(output=str(tmp_path))
    config.detectors.threads = before + 1
    benchmark.run_benchmark(config)
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_defects_per_set_fixes_every_sets_count_and_balances_real_types() -> None:
    from unidg.train.evaluation.config import EvalConfig, generated_count, rule_count
    from unidg.train.evaluation.datasets import InspectionSample
    from unidg.train.evaluation.training_sets import round_robin

    config = EvalConfig(output="o")
    assert (rule_count(config), generated_count(config)) == (64, 32)  # each set's own count
    config.detectors.defects_per_set = 12
    assert (rule_count(config), generated_count(config)) == (12, 12)
    samples = [InspectionSample(Path(f"{i}.png"), Path(f"{i}_m.png"), d, "o") for i, d in enumerate("aaaabbc")]
    chosen = round_robin(samples, 5)
    assert [s.defect for s in chosen] == ["a", "b", "c", "a", "b"]
    assert [s.image.name for s in chosen[:2]] == ["0.png", "4.png"]
    assert len(round_robin(samples, 20)) == 7  # fewer available: all of them


@pytest.mark.parametrize("name", ["eval-quick.toml", "eval-nano.toml", "eval-tiny.toml"])
def test_shipped_eval_configs_are_valid(name: str) -> None:
    config = load_eval_config(ROOT / "configs" / name)
    assert config.report.bootstrap >= 200
    if name != "eval-tiny.toml":
        assert len(config.seeds) >= 2 and config.detectors.defects_per_set > 0


def test_a_synthesized_folder_from_other_settings_is_refused(tmp_path: Path) -> None:
    from unidg.train.evaluation.benchmark import load_splits
    from unidg.train.evaluation.config import EvalConfig
    from unidg.train.evaluation.datasets import DatasetLayoutError

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "index.jsonl").write_text("")
    info = {"generator": "unidg.train.procedural", "count": 240, "seed": 9001, "size": 96}
    (folder / "dataset.json").write_text(json.dumps(info))
    config = EvalConfig(output=str(tmp_path / "o"))
    config.data.path, config.data.synth_count = str(folder), 960
    with pytest.raises(DatasetLayoutError, match="synthesized with .*'count': 240.* asks for .*'count': 960"):
        load_splits(config, progress=False)


def test_category_consistency_keeps_the_consistent_and_a_floor() -> None:
    from unidg.train.evaluation.detector_training import consistent_subset

    generated = LabelledSet(np.zeros((6, 8, 8, 3), np.uint8), np.zeros((6, 8, 8), bool), list("aabbcc"))
    scores = np.array([0.9, 0.2, 0.6, 0.1, 0.05, 0.55])
    assert consistent_subset(generated, scores, 0.5, 0.0).defects == ["a", "b", "c"]
    assert len(consistent_subset(generated, scores, 0.95, 0.0)) == 1  # never empty: the best one stays
    assert len(consistent_subset(generated, scores, 0.95, 0.5)) == 3  # the floor: the best half
    assert len(consistent_subset(generated, np.full(6, np.nan), 0.5, 0.0)) == 6  # one type: nothing to check


def test_multitask_unet_heads_share_one_backbone() -> None:
    import torch

    from unidg.train.detectors import MultiTaskUNet, UNet

    model = MultiTaskUNet(4, width=4, depth=2).eval()
    maps, types = model.both(torch.zeros(2, 3, 16, 16))
    assert maps.shape == (2, 1, 16, 16) and types.shape == (2, 4)
    assert torch.equal(model(torch.zeros(2, 3, 16, 16)), maps)  # forward: the defect map, as a binary UNet
    plain = {k for k in UNet(1, 4, 2).state_dict()}
    assert set(model.state_dict()) - plain == {"type_head.weight", "type_head.bias"}


def test_selection_settings_retrain_only_the_fifth_set() -> None:
    from unidg.train.evaluation.benchmark import _set_key, config_hash
    from unidg.train.evaluation.config import EvalConfig

    config, other = EvalConfig(output="o"), EvalConfig(output="o")
    other.generation.consistency_threshold = 0.8
    assert config_hash(config) == config_hash(other)  # the four sets' detectors stay cached
    assert _set_key(config, "selected") != _set_key(other, "selected")
    assert _set_key(config, "generated") == _set_key(other, "generated") == "generated"
    other.report.bootstrap = 50
    assert config_hash(config) == config_hash(other)  # intervals rescore, never retrain
    other.generation.compare_bundle, other.generation.compare_cache = "out/rft-bundle", "off"
    assert config_hash(config) == config_hash(other)  # the compare arm keys itself: (i)-(v) stay cached
    assert _set_key(config, "compare") != _set_key(other, "compare")
    other.generation.cache = "off"
    assert config_hash(config) != config_hash(other)  # (ii)'s own cache setting changes what it learns from


def test_compare_arm_runs_the_same_requests_with_another_cache_setting(tmp_path: Path, monkeypatch) -> None:
    """(ii') = (ii)'s requests with the step cache off: same sources, regions and labels; images that differ only by
    the caching error; and a paired (ii') - (ii) difference in the report."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "eval"
    args = ["eval", "run", "--config", "configs/eval-tiny.toml", "--out", str(out), "--quiet"]
    args += ["--set", f'data.path="{tmp_path / "data"}"', "--set", 'sets=["generated", "compare"]']
    args += ["--set", "generation.steps=28", "--set", "generation.per_object=2", "--set", "data.max_objects=1"]
    args += ["--set", 'generation.compare_cache="off"', "--set", 'generation.compare_label="step cache off"']
    assert main(args) == 0
    arrays = [np.load(p) for p in sorted((out / "cache" / "generated").iterdir())]
    assert len(arrays) == 2  # one file per arm: the cache setting is part of the key
    first, second = arrays
    np.testing.assert_array_equal(first["masks"], second["masks"])
    assert list(first["defects"]) == list(second["defects"])
    difference = np.abs(first["images"].astype(int) - second["images"].astype(int))
    assert 0 < difference.max() and difference.mean() < 2.0  # the gated cache: different bits, the same images
    report = json.loads((out / "report.json").read_text())
    assert [(d["minuend"], d["subtrahend"]) for d in report["differences"]] == [("compare", "generated")]
    markdown = (out / "report.md").read_text()
    assert "| (ii') − (ii) |" in markdown
    assert "(ii') step cache off: bundle `runtime/assets/unidg-nano-bundle`, step cache off" in markdown


def test_mask_templates_give_the_generated_sets_target_regions_of_the_references_categories(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(ROOT)
    base = ["eval", "run", "--config", "configs/eval-tiny.toml", "--quiet", "--set", f'data.path="{tmp_path / "data"}"']
    base += ["--set", 'sets=["generated"]', "--set", "data.max_objects=1", "--set", "generation.per_object=4"]
    assert main([*base, "--out", str(tmp_path / "shapes")]) == 0
    library = tmp_path / "templates"
    assert main(["data", "templates", "--udg", str(tmp_path / "data"), "--out", str(library), "--quiet"]) == 0
    args = [*base, "--out", str(tmp_path / "templated"), "--set", f'generation.mask_templates="{library}"']
    assert main(args) == 0
    (shapes,) = (tmp_path / "shapes" / "cache" / "generated").iterdir()
    (templated,) = (tmp_path / "templated" / "cache" / "generated").iterdir()
    with np.load(shapes) as a, np.load(templated) as b:
        assert list(a["defects"]) == list(b["defects"])  # the same references in the same order
        assert all(mask.any() for mask in b["masks"])
        assert not np.array_equal(a["masks"], b["masks"])  # the regions come from the library, not the shapes


def test_a_template_library_without_a_references_category_is_refused_before_generating(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(ROOT)
    other = tmp_path / "other"
    assert main(["data", "synth", "--out", str(other), "--count", "3", "--seed", "5", "--size", "32", "--quiet"]) == 0
    assert main(["data", "templates", "--udg", str(other), "--out", str(tmp_path / "t"), "--quiet"]) == 0
    args = ["eval", "run", "--config", "configs/eval-tiny.toml", "--quiet", "--out", str(tmp_path / "eval")]
    args += ["--set", f'data.path="{tmp_path / "data"}"', "--set", f'generation.mask_templates="{tmp_path / "t"}"']
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "generation.mask_templates" in error and "has no templates of" in error, error
    assert not (tmp_path / "eval").exists()


EVAL_REFUSALS = {
    "UDG folder without an index": ([], "data.path udg holds no UDG index (index.jsonl)"),
    "non-UTF-8 VisA CSV": (
        ["data.kind=visa", "data.path=visa", "data.split_csv=split.csv"],
        "split.csv is not UTF-8 text (byte 30: invalid start byte); save VisA's split CSV as UTF-8",
    ),
    "output a file": (["output=taken.txt"], "output taken.txt is a file; name a report folder"),
    "one image kept for the two-stage detector": (
        ["generation.per_object=2"],
        "keeps 1 image per object for the two-stage detector, which needs at least 2 (BatchNorm)",
    ),
    "one generated image": (
        ['sets=["generated"]', "generation.per_object=1"],
        "generation.per_object (or detectors.defects_per_set) 1 gives one generated image per object",
    ),
    "infinite lr": (["detectors.lr=inf"], "detectors.lr must be a finite number (got inf)"),
    "a compare arm equal to (ii)": (
        ['sets=["generated", "compare"]'],
        "the compare set needs generation.compare_bundle or generation.compare_cache",
    ),
    "an unknown cache setting": (
        ['generation.cache="fast"'],
        "generation.cache must be off, static, dynamic or \"\" (got 'fast')",
    ),
}


@pytest.mark.parametrize("case", list(EVAL_REFUSALS))
def test_bad_eval_inputs_are_refused_in_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys, case) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "udg").mkdir()
    (tmp_path / "visa").mkdir()
    (tmp_path / "split.csv").write_bytes(b"object,split,label,image,mask\n\xff\xfe bad,train,normal,a.png,\n")
    (tmp_path / "taken.txt").write_text("mine")
    (tmp_path / "e.toml").write_text('output = "out"\nseeds = [0]\n[data]\nkind = "udg"\npath = "udg"\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    overrides, message = EVAL_REFUSALS[case]
    args = ["eval", "run", "--config", "e.toml"] + [part for o in overrides for part in ("--set", o)]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error and len(error.strip().splitlines()) == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "taken.txt").read_text() == "mine"


def test_a_difference_the_seeds_disagree_on_is_marked_beside_its_interval() -> None:
    from unidg.train.evaluation.benchmark import _seed_differences
    from unidg.train.evaluation.report import markdown

    split = _seed_differences({"per_seed": [0.8, 0.9, 0.7]}, {"per_seed": [0.7, 0.8, 0.75]})
    assert split["per_seed"] == pytest.approx([0.1, 0.1, -0.05]) and split["seeds_agree"] is False
    assert _seed_differences({"per_seed": [0.8, 0.9]}, {"per_seed": [0.7, None]}) == {"per_seed": [pytest.approx(0.1)]}
    assert _seed_differences({"per_seed": [0.8, 0.9]}, {"per_seed": [0.7, 0.6]})["seeds_agree"] is True
    assert _seed_differences({"per_seed": [0.5, 0.5]}, {"per_seed": [0.5, 0.5]})["seeds_agree"] is True  # no sign
    report, _ = _report_fixture()
    value = report["differences"][0]["metrics"]["auroc_i"]
    assert "| +10.0 [+2.0, +19.0] * |" in markdown(report)
    value["seeds_agree"] = False
    assert "| +10.0 [+2.0, +19.0] * † |" in markdown(report)
