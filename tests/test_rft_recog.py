"""The Defect-Recog reward: ``unidg train reward-recog`` writes a loadable folder, the score combines the category
match with normalised pixel AUROC / AP / PRO, a local torchvision-layout checkpoint initialises the classifier, and
bad inputs are refused instead of scored zero."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from train_fixtures import udg_fixture

from unidg.cli import main
from unidg.core.errors import UniDGError
from unidg.train.config import ConfigError
from unidg.train.detectors import ResNet34
from unidg.train.reward_recog import CLASSES, DefectRecogReward, load_pretrained_backbone
from unidg.train.rewards import RewardError, RewardInputs, load_reward_config

udg = udg_fixture(6)


@pytest.fixture(scope="module")
def recog(udg: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("recog") / "reward"
    args = ["--size", "32", "--epochs", "1", "--batch", "8", "--resnet-width", "8", "--unet-width", "4"]
    assert main(["train", "reward-recog", "--data", str(udg), "--out", str(out), "--heldout", str(udg), *args]) == 0
    return out


def test_reward_recog_command_writes_a_loadable_folder(recog: Path) -> None:
    document = json.loads((recog / "recog.json").read_text())
    assert document["classes"] == list(CLASSES) and len(CLASSES) == 29 and document["examples"] == 12
    assert set(document["heldout"]) == {"category_accuracy", "auroc_p", "ap_p", "pro"}
    reward = DefectRecogReward(recog)
    assert reward.size == 32 and reward.classifier.fc.out_features == 29


class _Fixed(nn.Module):
    def __init__(self, output) -> None:
        super().__init__()
        self.output = output

    def forward(self, x):
        return self.output(x)


def _inputs(category: str = "scratch") -> RewardInputs:
    generated = np.full((1, 32, 32, 3), 120, np.uint8)
    target_mask = np.zeros((1, 32, 32), bool)
    target_mask[0, 8:16, 8:20] = True
    return RewardInputs(generated, target_mask, generated, target_mask, categories=[category], ids=["x"])


def test_score_is_the_mean_of_category_match_and_normalised_pixel_metrics(recog: Path) -> None:
    reward = DefectRecogReward(recog)
    mask = torch.from_numpy(_inputs().target_mask[:, None].astype(np.float32))
    logits = torch.zeros(1, len(CLASSES))
    logits[0, CLASSES.index("scratch")] = 5.0
    reward.classifier = _Fixed(lambda x: logits)
    reward.segmenter = _Fixed(lambda x: mask * 20 - 10)  # the target region exactly: AUROC = AP = PRO = 1
    output = reward.score(_inputs("scratch"))
    assert output.scores.tolist() == pytest.approx([1.0])
    wrong_category = reward.score(_inputs("missing"))  # another of the 28 categories: the match term drops to 0
    assert float(output.scores[0] - wrong_category.scores[0]) == pytest.approx(0.25)
    reward.segmenter = _Fixed(lambda x: 10 - mask * 20)  # the inverse map: AUROC 0 -> normalised 0
    output = reward.score(_inputs("scratch"))
    assert output.details["recog/auroc_p"].tolist() == [0.0] and output.details["recog/category"].tolist() == [1.0]
    assert 0.0 <= float(output.scores[0]) < 0.5


def test_bad_inputs_raise(recog: Path) -> None:
    reward = DefectRecogReward(recog)
    inputs = _inputs()
    inputs.target_mask[:] = False
    with pytest.raises(RewardError, match="positive and negative"):
        reward.score(inputs)
    with pytest.raises(RewardError, match="category"):
        reward.score(_inputs(""))
    with pytest.raises(UniDGError, match="reward-recog"):
        DefectRecogReward(recog.parent / "missing")


def test_a_config_naming_a_missing_checkpoint_fails_at_load(tmp_path: Path, recog: Path) -> None:
    path = tmp_path / "reward.toml"
    path.write_text(f'[recog]\nweight = 0.5\ncheckpoint = "{tmp_path / "nothing"}"\n')
    with pytest.raises(ConfigError, match="recog.checkpoint"):
        load_reward_config(path)
    path.write_text(f'[recog]\nweight = 0.5\ncheckpoint = "{recog}"\n[color]\nweight = 0.5\n')
    assert load_reward_config(path).recog.weight == 0.5


def test_local_torchvision_layout_checkpoint_initialises_the_backbone(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    imagenet = ResNet34(1000)  # torchvision's resnet34 layout: 1000 ImageNet classes
    path = tmp_path / "resnet34.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(path))
    classifier = ResNet34(len(CLASSES))
    loaded = load_pretrained_backbone(classifier, path)
    assert loaded == len([k for k in imagenet.state_dict() if not k.startswith("fc.")])
    assert torch.equal(classifier.layer3[2].conv1.weight, imagenet.layer3[2].conv1.weight)
    assert classifier.fc.out_features == len(CLASSES)
    with pytest.raises(ValueError, match="resnet_width = 64"):
        load_pretrained_backbone(ResNet34(len(CLASSES), width=8), path)


def _broken_copy(recog: Path, folder: Path, damage) -> Path:
    copy = folder / "reward"
    shutil.copytree(recog, copy)
    damage(copy)
    return copy


def _write_json(path: Path, change) -> None:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _replace_by_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()


BROKEN_FOLDERS = {
    "garbage recog.json": (lambda f: (f / "recog.json").write_bytes(b"\xff\x00 garbage"), "recog.json is not what"),
    "recog.json a list": (lambda f: (f / "recog.json").write_text("[1, 2]"), "recog.json is not what"),
    "unknown train key": (
        lambda f: _write_json(f / "recog.json", lambda d: d["train"].update(depth=3)),
        "recog.json is not what",
    ),
    "bad train value": (
        lambda f: _write_json(f / "recog.json", lambda d: d["train"].update(lr=-1.0)),
        "recog.json is not what",
    ),
    "other classes": (
        lambda f: _write_json(f / "recog.json", lambda d: d.update(classes=["crack", "dent"])),
        r"classifies \['crack', 'dent'\]",
    ),
    "truncated classifier": (lambda f: _truncate(f / "classifier.safetensors"), "classifier.safetensors cannot be"),
    "truncated segmenter": (lambda f: _truncate(f / "segmenter.safetensors"), "segmenter.safetensors cannot be"),
    "segmenter a folder": (lambda f: _replace_by_folder(f / "segmenter.safetensors"), "segmenter.safetensors cannot"),
    "other widths": (
        lambda f: _write_json(f / "recog.json", lambda d: d["train"].update(resnet_width=16)),
        "classifier.safetensors cannot be loaded",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_a_broken_reward_folder_is_refused_naming_the_file_and_the_fix(recog: Path, tmp_path: Path, case: str) -> None:
    damage, message = BROKEN_FOLDERS[case]
    with pytest.raises(UniDGError, match=message) as refused:
        DefectRecogReward(_broken_copy(recog, tmp_path, damage))
    assert "unidg train reward-recog" in str(refused.value) and "\n" not in str(refused.value)
