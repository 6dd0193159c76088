"""UniDG-Text's text branch in torch: CLIP-L + T5 and their tokenizers from a local FLUX-layout folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from text_fixtures import tiny_text_folder, tokenizer_texts
from transformers import CLIPTextModel, T5EncoderModel

from unidg.core.manifest import WeightsError
from unidg.core.text import CLIP_MAX_LENGTH, T5_MAX_LENGTH
from unidg.train.presets import FULL, NANO
from unidg.train.text_encoders import FULL_TEXT, TextEncoderError, TextEncoders, load_text_encoders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_text_folder(tmp_path_factory)


@pytest.fixture(scope="module")
def encoders(folder: Path) -> TextEncoders:
    return load_text_encoders(folder)


def test_the_folder_has_flux_layout_and_feeds_the_nano_transformer(folder: Path, encoders: TextEncoders) -> None:
    for name in ("text_encoder", "text_encoder_2"):
        assert (folder / name / "config.json").is_file() and (folder / name / "model.safetensors").is_file()
    for name in ("tokenizer", "tokenizer_2"):
        assert (folder / name / "tokenizer.json").is_file()
    encoders.check_transformer(NANO.transformer.pooled_projection_dim, NANO.transformer.joint_attention_dim)
    with pytest.raises(TextEncoderError, match="pooled_projection_dim 768"):
        encoders.check_transformer(FULL.transformer.pooled_projection_dim, FULL.transformer.joint_attention_dim)


def test_encode_follows_flux_conventions(encoders: TextEncoders) -> None:
    texts = tokenizer_texts(8)
    ids = encoders.tokenize(texts)
    clip, t5 = ids["clip_ids"], ids["t5_ids"]
    assert clip.shape == (len(texts), CLIP_MAX_LENGTH) and t5.shape == (len(texts), T5_MAX_LENGTH)
    clip_tok, t5_tok = encoders.clip_tokenizer, encoders.t5_tokenizer
    assert (clip[:, 0] == clip_tok.bos_token_id).all()
    # Over-length texts are truncated with their end token kept; short ones are padded after it.
    assert clip[-1, -1] == clip_tok.eos_token_id and ids["clip_mask"][-1].all()
    assert t5[-1, -1] == t5_tok.eos_token_id and ids["t5_mask"][-1].all()
    short = int(ids["t5_mask"][0].sum())
    assert t5[0, short - 1] == t5_tok.eos_token_id and (t5[0, short:] == t5_tok.pad_token_id).all()
    pooled, hidden = encoders.encode(texts)
    assert pooled.shape == (len(texts), NANO.transformer.pooled_projection_dim)
    assert hidden.shape == (len(texts), T5_MAX_LENGTH, NANO.transformer.joint_attention_dim)
    assert torch.isfinite(hidden).all() and not torch.equal(hidden[0], hidden[1])
    _, short_hidden = encoders.encode(texts[:2], max_length=16)
    assert short_hidden.shape[1] == 16


def test_encode_equals_diffusers_flux_pipeline(encoders: TextEncoders) -> None:
    """diffusers' own FluxPipeline.encode_prompt on the same modules: the same pooled and hidden states."""
    pipeline = FluxPipeline(
        scheduler=None,
        vae=None,
        text_encoder=encoders.clip,
        tokenizer=encoders.clip_tokenizer,
        text_encoder_2=encoders.t5,
        tokenizer_2=encoders.t5_tokenizer,
        transformer=None,
    )
    texts = tokenizer_texts(4)
    with torch.no_grad():
        hidden_ref, pooled_ref, text_ids = pipeline.encode_prompt(prompt=texts, prompt_2=None, max_sequence_length=512)
    pooled, hidden = encoders.encode(texts)
    assert torch.equal(pooled, pooled_ref)
    assert (hidden - hidden_ref).abs().max() < 1e-5
    assert not text_ids.any()


def test_a_reload_gives_identical_outputs(folder: Path, encoders: TextEncoders) -> None:
    again = load_text_encoders(folder)
    texts = tokenizer_texts(4)
    for first, second in zip(encoders.encode(texts), again.encode(texts)):
        assert torch.equal(first, second)


def test_folders_that_are_not_flux_text_encoders_are_refused(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no such file or folder"):
        load_text_encoders(tmp_path / "missing")
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    shutil.rmtree(partial / "tokenizer_2")
    with pytest.raises(WeightsError, match="tokenizer_2/"):
        load_text_encoders(partial)
    swapped = tmp_path / "swapped"
    shutil.copytree(folder, swapped)
    config = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    (swapped / "text_encoder" / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="'t5' model; the CLIP text encoder"):
        load_text_encoders(swapped)
    with pytest.raises(TextEncoderError, match="non-empty list"):
        load_text_encoders(folder).tokenize("one string")


def test_the_full_preset_has_flux_text_encoder_shapes() -> None:
    """CLIP-L's text tower and T5-XXL v1.1's encoder, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        clip = CLIPTextModel(FULL_TEXT.clip_config())
        t5 = T5EncoderModel(FULL_TEXT.t5_config())
    assert sum(p.numel() for p in clip.parameters()) == 123_060_480
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    assert clip.config.hidden_size == FULL.transformer.pooled_projection_dim
    assert t5.config.d_model == FULL.transformer.joint_attention_dim
