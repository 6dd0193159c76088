"""``unidg train merge``: the merged weights folder computes what the unmerged LoRA model computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unidg.core.manifest import read_manifest, verify_files
from unidg.core.settings import UniDGSettings
from unidg.train.config import LoraConfig
from unidg.train.loading import load_model, save_model
from unidg.train.lora import add_lora, load_lora_state_dict, save_lora
from unidg.train.merge import merge_lora, probe_inputs, probe_velocity
from unidg.train.model import UniDGModel

SETTINGS = UniDGSettings(resolution=64, text_tokens=8, guidance=1.0, steps=4)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def base_and_lora(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("merge")
    base = save_model(UniDGModel.from_preset("nano", seed=0, settings=SETTINGS), root / "base")
    model = load_model(base)
    lora = LoraConfig(rank=4, alpha=8.0)
    modules = add_lora(model.transformer, lora)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking LoRA: B is no longer zero
        for name, parameter in model.transformer.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    settings = {**SETTINGS.to_dict(), "alpha": 3.0}
    save_lora(root / "sft", model.transformer, lora, modules, {"settings": settings, "steps": 5})
    return base, root / "sft", settings


def test_merged_output_equals_the_unmerged_lora_model(tmp_path: Path, base_and_lora) -> None:
    base, lora_folder, _ = base_and_lora
    report = merge_lora(base, lora_folder, tmp_path / "merged")
    merged = load_model(tmp_path / "merged")

    unmerged = load_model(base)
    info = json.loads((lora_folder / "lora.json").read_text())
    add_lora(unmerged.transformer, LoraConfig(rank=info["rank"], alpha=info["alpha"], targets=info["targets"]))
    from safetensors.torch import load_file

    load_lora_state_dict(unmerged.transformer, load_file(str(lora_folder / "lora.safetensors")))
    unmerged.settings = merged.settings

    probe = probe_inputs(merged, seed=5)
    with_lora = probe_velocity(unmerged.eval(), probe, 1.0)
    folded = probe_velocity(merged, probe, 1.0)
    plain = probe_velocity(load_model(base), probe, 1.0)
    max_abs_diff = float((folded - with_lora).abs().max())
    print(f"merge max abs diff (velocity, nano): {max_abs_diff:.3g}")
    assert max_abs_diff < 1e-5
    assert float((with_lora - plain).abs().max()) > 1e-3  # the LoRA really changes the model
    assert report["merge"]["max_abs_diff_vs_unmerged"] < 1e-5
    # No LoRA layers remain in the merged transformer: it is a plain FLUX transformer.
    assert not any("lora" in name for name in merged.transformer.state_dict())


def test_merged_sampler_output_equals_the_unmerged(tmp_path: Path, base_and_lora) -> None:
    """The whole torch sampler (4 steps + VAE decode) gives the same image with merged and unmerged weights."""
    from safetensors.torch import load_file

    from unidg.train.sampler import prepare_inputs, sample

    base, lora_folder, _ = base_and_lora
    merge_lora(base, lora_folder, tmp_path / "merged")
    merged = load_model(tmp_path / "merged")
    unmerged = load_model(base, settings=merged.settings)
    info = json.loads((lora_folder / "lora.json").read_text())
    add_lora(unmerged.transformer, LoraConfig(rank=info["rank"], alpha=info["alpha"], targets=info["targets"]))
    load_lora_state_dict(unmerged.transformer, load_file(str(lora_folder / "lora.safetensors")))
    generator = torch.Generator().manual_seed(0)
    image = (torch.rand(64, 128, 3, generator=generator) * 255).to(torch.uint8).numpy()
    mask = torch.zeros(64, 128, dtype=torch.bool)
    mask[16:48, 80:112] = True
    images = []
    for model in (merged, unmerged.eval()):
        with torch.no_grad():
            inputs = prepare_inputs(model, image, mask.numpy())
            images.append(sample(model, inputs, seeds=[3]).astype(int))
    assert abs(images[0] - images[1]).max() <= 1  # uint8 rounding of float32 noise at most


def test_merged_folder_is_a_weights_folder_with_settings(tmp_path: Path, base_and_lora) -> None:
    base, lora_folder, settings = base_and_lora
    merge_lora(base, lora_folder, tmp_path / "merged", settings_overrides={"steps": 28, "guidance": 1.0})
    folder = tmp_path / "merged"
    manifest = read_manifest(folder, kind="weights")
    verify_files(folder, manifest)
    assert manifest.metadata["stage"] == "merged"
    assert manifest.metadata["merge"]["lora_rank"] == 4
    assert manifest.metadata["merge"]["base_fingerprint"] == read_manifest(base).fingerprint
    saved = UniDGSettings.load(folder)
    assert saved.alpha == 3.0  # the settings the LoRA was trained with
    assert saved.steps == 28 and saved.resolution == 64 and saved.text_tokens == 8  # S, K, steps, guidance, beta, T
    assert saved.beta == settings["beta"] and saved.threshold == settings["threshold"]
    files = [p for p in folder.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    # Changing a byte is caught by the manifest.
    target = weights[0]
    target.write_bytes(target.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ValueError, match="does not match its manifest"):
        verify_files(folder, read_manifest(folder))


def test_merge_refuses_bad_inputs(tmp_path: Path, base_and_lora) -> None:
    base, lora_folder, _ = base_and_lora
    with pytest.raises(FileNotFoundError, match="lora.safetensors"):
        merge_lora(base, tmp_path, tmp_path / "out")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        merge_lora(base, lora_folder, tmp_path / "exists")
    with pytest.raises(ValueError, match="unknown UniDG settings"):
        merge_lora(base, lora_folder, tmp_path / "o2", settings_overrides={"stepz": 3})


def test_merge_command_line(tmp_path: Path, base_and_lora, capsys) -> None:
    from unidg.cli import main

    base, lora_folder, _ = base_and_lora
    code = main(
        ["train", "merge", "--base", str(base), "--lora", str(lora_folder), "--out", str(tmp_path / "m")]
        + ["--setting", "steps=28"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["merge"]["max_abs_diff_vs_unmerged"] < 1e-5
    assert UniDGSettings.load(tmp_path / "m").steps == 28
    assert main(["train", "merge", "--base", str(base), "--lora", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
