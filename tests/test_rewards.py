"""Rewards behind one interface: the colour term by hand, the weighted combination, errors instead of silent
zeros, reward configs, and ``unidg eval reward-bench`` on a small bench scored by a local judge server."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from test_judge import FakeJudge, server  # noqa: F401  (the local judge server fixture)

from unidg.cli import main
from unidg.train.config import ConfigError
from unidg.train.reward_bench import agreement
from unidg.train.rewards import (
    ColorAdherenceReward,
    RewardError,
    RewardInputs,
    RewardOutput,
    WeightedReward,
    load_reward_config,
)


def _inputs(generated_level: int) -> RewardInputs:
    reference = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    reference[0, :4] = (200, 0, 0)  # the defect: red
    reference_mask = np.zeros((1, 8, 8), dtype=bool)
    reference_mask[0, :4] = True
    source = np.full((1, 8, 8, 3), 100, dtype=np.uint8)  # grey target surface
    generated = source.copy()
    target_mask = np.zeros((1, 8, 8), dtype=bool)
    target_mask[0, 2:6, 2:6] = True
    generated[0, 2:6, 2:6] = (generated_level, 100, 100)
    return RewardInputs(reference, reference_mask, generated, target_mask, source, ["scratch"], ["a"])


def test_color_reward_by_hand() -> None:
    reward = ColorAdherenceReward()
    # unchanged source: d_src = 0 -> 0; red channel 200 with G, B 100: d_ref = sqrt(2 * 100^2), d_src = 100
    assert reward.score(_inputs(100)).scores.tolist() == [0.0]
    output = reward.score(_inputs(200))
    d_ref, d_src = np.sqrt(2 * 100.0**2), 100.0
    assert output.scores.tolist() == pytest.approx([d_src / (d_ref + d_src)])
    assert output.details["color/to_source"].tolist() == pytest.approx([100.0])


def test_empty_masks_and_missing_source_raise_instead_of_scoring_zero() -> None:
    inputs = _inputs(200)
    inputs.target_mask[:] = False
    with pytest.raises(RewardError, match="empty target mask"):
        ColorAdherenceReward().score(inputs)
    inputs = _inputs(200)
    inputs.source = None
    with pytest.raises(RewardError, match="unedited target"):
        ColorAdherenceReward().score(inputs)


class _Constant:
    def __init__(self, name: str, values: list[float]) -> None:
        self.name, self.values = name, values

    def score(self, inputs: RewardInputs) -> RewardOutput:
        return RewardOutput(np.array(self.values), {f"{self.name}/raw": np.array(self.values) * 10})


def test_weighted_combination_and_details() -> None:
    inputs = RewardInputs(*(np.zeros((2, 4, 4, 3), np.uint8), np.ones((2, 4, 4), bool)) * 2)
    reward = WeightedReward([(0.5, _Constant("gen", [1.0, 0.2])), (0.5, _Constant("det", [0.0, 0.6]))])
    output = reward.score(inputs)
    assert output.scores.tolist() == pytest.approx([0.5, 0.4])
    assert set(output.details) == {"gen", "gen/raw", "det", "det/raw"}
    with pytest.raises(RewardError, match="non-finite score for sample '1'"):
        WeightedReward([(1.0, _Constant("bad", [0.0, float("nan")]))]).score(inputs)
    with pytest.raises(RewardError, match="returned"):
        WeightedReward([(1.0, _Constant("short", [0.0]))]).score(inputs)


def test_reward_configs_are_validated(tmp_path) -> None:
    path = tmp_path / "reward.toml"
    path.write_text("[color]\nweight = 0.0\n")
    with pytest.raises(ConfigError, match="no reward term"):
        load_reward_config(path)
    path.write_text('[judge]\nweight = 0.5\nurl = "http://127.0.0.1:9/v1"\n')
    with pytest.raises(ConfigError, match="judge.model"):
        load_reward_config(path)
    path.write_text("[colour]\nweight = 1.0\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_reward_config(path)
    path.write_text('[judge]\nweight = 0.5\nurl = "http://127.0.0.1:9/v1"\nmodel = "m"\n[color]\nweight = 0.5\n')
    config = load_reward_config(path)
    assert (config.judge.weight, config.color.weight) == (0.5, 0.5)


def test_agreement_counts_within_tolerance() -> None:
    accuracy = agreement({"Consistency": [4.0, 3.0, 1.0, 2.0]}, {"Consistency": [4.3, 3.31, 0.0, 2.0]})
    assert accuracy == {"Consistency": 50.0}  # 0.3 counts, 0.31 and 1.0 do not


def _write_bench(folder, levels_and_human) -> None:
    folder.mkdir()
    lines = []
    for i, (level, human) in enumerate(levels_and_human):
        Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(folder / f"ref{i}.png")
        Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), 6)).save(folder / f"refmask{i}.png")
        Image.fromarray(np.full((16, 16, 3), level, np.uint8)).save(folder / f"target{i}.png")
        Image.fromarray(np.pad(np.full((4, 4), 255, np.uint8), 6)).save(folder / f"mask{i}.png")
        scores = {"Reference Adherence": human, "Consistency": human, "Reasonability": human, "Overall Quality": 0.0}
        record = {
            "id": f"p{i}",
            "reference": f"ref{i}.png",
            "reference_mask": f"refmask{i}.png",
            "target": f"target{i}.png",
            "target_mask": f"mask{i}.png",
            "scores": scores,
        }
        lines.append(json.dumps(record))
    (folder / "bench.jsonl").write_text("\n".join(lines) + "\n")


def test_reward_bench_command(server, tmp_path, capsys) -> None:  # noqa: F811
    # The fake judge answers 5 * level / 255 on every dimension: 51 -> 1.0, 102 -> 2.0, 153 -> 3.0.
    _write_bench(tmp_path / "bench", [(51, 1.2), (102, 2.0), (153, 3.5)])
    config = tmp_path / "reward.toml"
    config.write_text(f'[judge]\nweight = 1.0\nurl = "{server}"\nmodel = "m"\nretries = 0\n')
    code = main(
        [
            "eval",
            "reward-bench",
            "--reward",
            str(config),
            "--bench",
            str(tmp_path / "bench"),
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 3 and report["tolerance"] == 0.3
    assert report["accuracy"]["Reference Adherence"] == pytest.approx(200 / 3, abs=0.01)  # 0.2 and 0 in, 0.5 out
    assert report["accuracy"]["Overall Quality"] == 0.0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert rows[1]["Consistency"] == {"predicted": pytest.approx(2.0, abs=1e-3), "human": 2.0}


def test_reward_bench_refuses_a_reward_without_rubric_dimensions(tmp_path, capsys) -> None:
    _write_bench(tmp_path / "bench", [(51, 1.0)])
    config = tmp_path / "reward.toml"
    config.write_text("[color]\nweight = 1.0\n")
    # The colour term needs the unedited target, which this bench does not give: a clear error, not a zero.
    assert main(["eval", "reward-bench", "--reward", str(config), "--bench", str(tmp_path / "bench")]) == 2
    assert "unedited target" in capsys.readouterr().err
    index = tmp_path / "bench" / "bench.jsonl"
    record = json.loads(index.read_text())
    index.write_text(json.dumps({**record, "source": "target0.png"}) + "\n")
    assert main(["eval", "reward-bench", "--reward", str(config), "--bench", str(tmp_path / "bench")]) == 2
    assert "no dimension to compare" in capsys.readouterr().err
    (tmp_path / "bench" / "bench.jsonl").write_text('{"id": "x", "scores": {"Consistency": 9}}\n')
    assert main(["eval", "reward-bench", "--reward", str(config), "--bench", str(tmp_path / "bench")]) == 2
    assert "must be a number in [0, 5]" in capsys.readouterr().err
