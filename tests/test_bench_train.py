"""``unidg bench train``: the dry run's rows on the CPU (the GPU figures need a GPU; see docs/performance.md)."""

from __future__ import annotations

import json

import pytest
import torch

from unidg.cli import main
from unidg.train.bench_train import DRY_RUN_FULL, SOURCE_CONFIGS, recipe_folder, run_train_bench, slice_preset
from unidg.train.config import load_sft_config
from unidg.train.lora import lora_parameter_count
from unidg.train.model import UniDGModel


def test_slice_preset_keeps_the_width_and_cuts_the_blocks():
    cut = slice_preset()
    assert (cut.transformer.num_layers, cut.transformer.num_single_layers) == (1, 1)
    assert cut.transformer.num_attention_heads * cut.transformer.attention_head_dim == 3072
    assert cut.image_encoder == slice_preset(blocks=(19, 38)).image_encoder


def test_dry_run_times_both_rows_with_the_recipes_lora(tmp_path, one_torch_thread):
    assert main(["bench", "train", "--dry-run", "--steps", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_train.json").read_text())
    assert report["dry_run"] is True and [row["device"] for row in report["rows"]] == ["cpu", "cpu"]
    assert all(row["median_ms"] > 0 and row["peak_memory_gib"] is None for row in report["rows"])
    # The slice row trains exactly the LoRA that the full recipe puts on a 1 + 1 block transformer.
    config = load_sft_config(SOURCE_CONFIGS / "full-sft.toml", DRY_RUN_FULL)
    model = UniDGModel.from_preset(slice_preset(width_of="nano"), device="meta")
    assert report["rows"][0]["trainable_parameters"] == lora_parameter_count(model.transformer, config.lora)
    assert "gradient checkpointing" in report["rows"][0]["note"]
    assert "| nano | cpu |" in (tmp_path / "bench_train.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the refusal is for machines without one")
def test_without_a_gpu_the_real_run_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="needs a CUDA GPU.*--dry-run"):
        run_train_bench(dry_run=False)


def test_the_recipes_come_from_configs_or_the_source_checkout_and_a_folder_without_them_is_refused(
    tmp_path, monkeypatch
) -> None:
    import shutil

    from unidg.core.errors import OptionError

    assert recipe_folder() == SOURCE_CONFIGS  # a source checkout: its own configs/
    for name in ("full-sft.toml", "nano-sft.toml"):
        shutil.copy(SOURCE_CONFIGS / name, tmp_path / name)
    assert recipe_folder(tmp_path) == tmp_path
    (tmp_path / "nano-sft.toml").unlink()
    with pytest.raises(OptionError, match=r"--configs .* hold\(s\) no such pair: pass --configs DIR"):
        recipe_folder(tmp_path)
    # An installed wheel: no configs beside the package, none in the working folder either.
    monkeypatch.setattr("unidg.train.bench_train.SOURCE_CONFIGS", tmp_path / "absent")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OptionError, match="the configs/ folder of a unidg source checkout"):
        run_train_bench(dry_run=True)
