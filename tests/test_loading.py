"""Weights round trips: diffusers layout (save_model / load_model) and BFL single files (load_bfl)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from weights_fixtures import assert_same_model, model_outputs, random_nano

from unidg.core.manifest import read_manifest, verify_files
from unidg.core.settings import UniDGSettings
from unidg.train.loading import (
    BFL_REDUX_FILE,
    BFL_TRANSFORMER_FILE,
    BFL_VAE_FILE,
    WeightsError,
    bfl_transformer_state_dict,
    bfl_vae_state_dict,
    convert_bfl_transformer,
    load_bfl,
    load_model,
    save_model,
)
from unidg.train.model import UniDGModel
from unidg.train.presets import FULL


@pytest.fixture(scope="module")
def nano() -> UniDGModel:
    return random_nano()


def test_diffusers_layout_round_trip(nano: UniDGModel, tmp_path: Path) -> None:
    settings = UniDGSettings(resolution=256, text_tokens=8, steps=12, guidance=1.0, alpha=3.0)
    nano.settings = settings
    folder = save_model(nano, tmp_path / "weights", metadata={"trained_by": "test"})
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert all(not name.endswith((".bin", ".pt", ".pth", ".ckpt")) for name in files)
    for component in ("transformer", "vae", "image_encoder", "redux"):
        assert (folder / component / "config.json").is_file()
        assert list((folder / component).glob("*.safetensors"))
    manifest = read_manifest(folder, kind="weights")
    verify_files(folder, manifest)
    assert manifest.metadata["trained_by"] == "test"
    assert manifest.metadata["parameters"] == nano.parameter_count()
    assert "unidg.json" in manifest.files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0700

    loaded = load_model(folder)
    assert loaded.settings == settings
    assert_same_model(loaded, nano)

    with pytest.raises(WeightsError, match="already exists"):
        save_model(nano, folder)
    save_model(nano, folder, overwrite=True)
    verify_files(folder, read_manifest(folder))


def test_load_model_errors_name_the_problem(nano: UniDGModel, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="is not a folder"):
        load_model(tmp_path / "missing")
    folder = save_model(nano, tmp_path / "weights")
    (folder / "unidg.json").unlink()
    with pytest.raises(WeightsError, match="unidg.json"):
        load_model(folder)
    (folder / "redux" / "config.json").unlink()
    with pytest.raises(WeightsError, match="redux/config.json or image_embedder/config.json"):
        load_model(folder, settings=UniDGSettings())


def _write_bfl(model: UniDGModel, folder: Path) -> None:
    folder.mkdir()
    transformer = bfl_transformer_state_dict(model.transformer.state_dict())
    save_file({k: v.contiguous() for k, v in transformer.items()}, str(folder / BFL_TRANSFORMER_FILE))
    save_file({k: v.contiguous() for k, v in bfl_vae_state_dict(model.vae.state_dict()).items()}, folder / BFL_VAE_FILE)
    save_file({k: v.contiguous() for k, v in model.redux.state_dict().items()}, str(folder / BFL_REDUX_FILE))
    model.image_encoder.save_pretrained(folder / "image_encoder")


def test_bfl_key_names_follow_the_original_checkpoints(nano: UniDGModel) -> None:
    transformer = bfl_transformer_state_dict(nano.transformer.state_dict())
    width = nano.transformer.config.num_attention_heads * nano.transformer.config.attention_head_dim
    assert transformer["double_blocks.0.img_attn.qkv.weight"].shape == (3 * width, width)
    assert transformer["single_blocks.3.linear1.weight"].shape == (7 * width, width)
    assert transformer["single_blocks.3.linear2.weight"].shape == (width, 5 * width)
    assert {"img_in.weight", "txt_in.weight", "guidance_in.in_layer.weight", "final_layer.linear.weight"} <= set(
        transformer
    )
    assert "double_blocks.1.txt_attn.norm.key_norm.scale" in transformer
    vae = bfl_vae_state_dict(nano.vae.state_dict())
    assert vae["encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convolutions, as in ae.safetensors
    assert {"encoder.down.0.block.0.conv1.weight", "decoder.up.3.block.1.conv1.weight"} <= set(vae)
    assert "decoder.up.0.upsample.conv.weight" not in vae  # the full-resolution level has no upsampler
    assert "decoder.up.3.upsample.conv.weight" in vae
    assert all("_blocks" not in key and "conv_norm_out" not in key for key in vae)
    # The converter inverts the mapping exactly, with the "model.diffusion_model." prefix of some BFL exports too.
    prefixed = {f"model.diffusion_model.{key}": value for key, value in transformer.items()}
    converted = convert_bfl_transformer(prefixed, width)
    expected = nano.transformer.state_dict()
    assert set(converted) == set(expected)
    assert all(torch.equal(converted[key], expected[key]) for key in expected)


def test_bfl_conversion_at_full_size_on_meta() -> None:
    """The real FLUX.1-Fill shapes (on the meta device: no memory) survive diffusers -> BFL -> diffusers."""
    full = UniDGModel.from_preset("full", device="meta", dtype=torch.bfloat16)
    expected = full.transformer.state_dict()
    bfl = bfl_transformer_state_dict(expected)
    assert bfl["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    assert bfl["double_blocks.18.img_attn.qkv.weight"].shape == (9216, 3072)
    assert bfl["img_in.weight"].shape == (3072, 384) and bfl["final_layer.linear.weight"].shape == (64, 3072)
    converted = convert_bfl_transformer(bfl, 3072)
    assert {key: tuple(value.shape) for key, value in converted.items()} == {
        key: tuple(value.shape) for key, value in expected.items()
    }
    vae = full.vae.state_dict()
    vae_bfl = bfl_vae_state_dict(vae)
    assert vae_bfl["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert vae_bfl["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    vae_back = convert_ldm_vae_checkpoint(vae_bfl, FULL.vae.config())
    assert {k: tuple(v.shape) for k, v in vae_back.items()} == {k: tuple(v.shape) for k, v in vae.items()}


def test_bfl_single_files_round_trip(nano: UniDGModel, tmp_path: Path) -> None:
    _write_bfl(nano, tmp_path / "bfl")
    loaded = load_bfl(tmp_path / "bfl", preset="nano", settings=nano.settings)
    assert_same_model(loaded, nano)
    explicit = load_bfl(
        preset="nano",
        transformer_file=tmp_path / "bfl" / BFL_TRANSFORMER_FILE,
        vae_file=tmp_path / "bfl" / BFL_VAE_FILE,
        redux_file=tmp_path / "bfl" / BFL_REDUX_FILE,
        image_encoder_folder=tmp_path / "bfl" / "image_encoder",
    )
    assert torch.equal(model_outputs(explicit)["velocity"], model_outputs(nano)["velocity"])


def test_bfl_errors_name_the_file(nano: UniDGModel, tmp_path: Path) -> None:
    folder = tmp_path / "bfl"
    _write_bfl(nano, folder)
    with pytest.raises(WeightsError, match="does not fit|rows"):
        load_bfl(folder, preset="full")  # nano weights, full-size config
    (folder / BFL_VAE_FILE).write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match=BFL_VAE_FILE):
        load_bfl(folder, preset="nano")
    (folder / BFL_REDUX_FILE).unlink()
    with pytest.raises(WeightsError, match="not found"):
        load_bfl(folder, preset="nano", vae_file=tmp_path / "nowhere.safetensors")
    config = json.loads((folder / "image_encoder" / "config.json").read_text())
    assert config["hidden_size"] == 64
