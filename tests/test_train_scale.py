"""`unidg train plan` (counts on the meta device, memory per GPU) and `unidg train eq9` (where Eq. 9 separates the
ground truth from a copy of the normal image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unidg.cli import main
from unidg.train.config import LoraConfig, load_sft_config
from unidg.train.lora import add_lora, lora_parameter_count
from unidg.train.model import UniDGModel
from unidg.train.plan import memory_plan

FULL_SFT = Path(__file__).resolve().parents[1] / "configs" / "full-sft.toml"


def test_full_sft_config_has_the_paper_recipe() -> None:
    config = load_sft_config(FULL_SFT)
    assert config.lora.rank == 256 and config.optim.name == "prodigy" and config.optim.use_bias_correction
    assert config.optim.weight_decay == 0.01 and config.train.batch_size == 64
    assert config.settings["resolution"] == 768 and (config.loss.logit_mean, config.loss.logit_std) == (0.0, 1.0)
    assert config.train.device == "cuda" and config.train.precision == "bf16" and config.train.gradient_checkpointing


def test_lora_count_on_the_meta_device_equals_peft_adapters() -> None:
    lora = LoraConfig(rank=4)
    model = UniDGModel.from_preset("nano", seed=0)
    expected = lora_parameter_count(model.transformer, lora)
    add_lora(model.transformer, lora)
    assert expected == sum(p.numel() for p in model.transformer.parameters() if p.requires_grad)


def test_plan_counts_the_meta_model_and_splits_the_global_batch(capsys) -> None:
    config = load_sft_config(FULL_SFT)
    plan = memory_plan(config, gpus=8)
    meta = UniDGModel.from_preset("full", device="meta", seed=None)
    assert plan["parameters"]["total"] == meta.parameter_count()["total"]
    assert plan["parameters"]["lora"] == lora_parameter_count(meta.transformer, config.lora)
    assert (plan["per_gpu_batch"], plan["micro_batch"], plan["accumulation_steps"]) == (8, 1, 8)
    gib = plan["per_gpu_gib"]
    # bf16 frozen weights: 2 bytes a parameter; Prodigy: 4 fp32 tensors per LoRA parameter.
    assert gib["frozen_weights"] == pytest.approx(plan["parameters"]["total"] * 2 / 2**30, abs=0.01)
    assert gib["optimizer_state"] == pytest.approx(plan["parameters"]["lora"] * 16 / 2**30, abs=0.01)
    assert 40 < gib["total"] < 80  # fits one 80 GB GPU per process
    assert memory_plan(config, gpus=4)["accumulation_steps"] == 16
    with pytest.raises(ValueError, match="does not split over 3 GPUs"):
        memory_plan(config, gpus=3)
    assert main(["train", "plan", "--config", str(FULL_SFT), "--gpus", "8", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["total"] == plan["parameters"]["total"]
    # A user's mistake is one line naming the option, not a traceback.
    assert main(["train", "plan", "--config", str(FULL_SFT), "--gpus", "0"]) == 2
    assert "--gpus must be >= 1" in capsys.readouterr().err


def test_eq9_on_the_defect_separates_the_ground_truth_from_the_normal_copy(tmp_path: Path, capsys) -> None:
    """On the shipped nano autoencoder the ground truth's hinge over the defect's latent pixels is well below the
    normal copy's (which is 1 - tau by construction); over the dilated target tokens the two nearly meet."""
    from unidg.train.procedural import synthesize

    data = tmp_path / "udg"
    synthesize(data, 10, seed=7, size=64, progress=False)
    weights = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "unidg-nano"
    assert main(["train", "eq9", "--weights", str(weights), "--data", str(data), "--count", "12"]) == 0
    regions = json.loads(capsys.readouterr().out)["regions"]
    assert all(r["hinge_normal_copy"] == pytest.approx(0.5) for r in regions.values())
    old, new = regions["dilated-tokens"], regions["mask-and-defect-latent"]
    assert new["hinge_ground_truth"] < old["hinge_ground_truth"]
    assert new["margin"] > 1.5 * old["margin"]
