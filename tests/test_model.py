"""UniDGModel: presets, real parameter counts on the meta device, the Fill layout against diffusers and the runtime."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import FluxFillPipeline

from unidg.core import latents as np_latents
from unidg.core.settings import UniDGSettings
from unidg.train.model import UniDGModel, image_ids, pack_latents, pack_mask, unpack_latents
from unidg.train.presets import FULL, NANO, PRESETS, TransformerParams, VaeParams, get_preset

# FLUX.1-Fill-dev transformer, FLUX VAE, SigLIP so400m vision tower (with its pooling head), Redux embedder.
FULL_COUNTS = {
    "transformer": 11_902_391_360,
    "vae": 83_819_683,
    "image_encoder": 428_225_600,
    "redux": 64_503_808,
}


@pytest.fixture(scope="module")
def nano() -> UniDGModel:
    return UniDGModel.from_preset("nano")


def test_full_preset_on_meta_has_the_real_parameter_counts() -> None:
    model = UniDGModel.from_preset("full", device="meta", dtype=torch.bfloat16)
    counts = model.parameter_count()
    print(f"full preset parameters: {counts}")
    assert {name: counts[name] for name in FULL_COUNTS} == FULL_COUNTS
    assert counts["total"] == sum(FULL_COUNTS.values())
    assert all(parameter.is_meta for parameter in model.parameters())
    assert model.dtype == torch.bfloat16
    config = model.transformer.config
    assert (config.in_channels, config.out_channels, config.num_layers, config.num_single_layers) == (384, 64, 19, 38)
    assert model.reference_size == 384 and model.reference_tokens == 729 and model.joint_dim == 4096
    assert model.settings == UniDGSettings()


def test_nano_preset_is_tiny_and_consistent(nano: UniDGModel) -> None:
    counts = nano.parameter_count()
    assert counts["total"] < 5_000_000
    assert nano.reference_size == NANO.reference_size == 64
    assert nano.reference_tokens == NANO.reference_tokens == 64
    assert nano.settings.resolution == 256 and nano.settings.text_tokens == 8
    assert nano.vae_scale_factor == 8
    assert get_preset("nano") is NANO and get_preset(FULL) is FULL and set(PRESETS) == {"full", "nano"}
    with pytest.raises(ValueError, match="unknown model preset"):
        get_preset("large")
    with pytest.raises(ValueError, match="must sum to attention_head_dim"):
        TransformerParams(1, 1, 32, 2, 16, 8, (8, 8, 8))
    with pytest.raises(ValueError, match="8x VAE"):
        VaeParams(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=32, sample_size=64)


def test_from_preset_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    first = UniDGModel.from_preset("nano", seed=5)
    after = torch.rand(1)
    second = UniDGModel.from_preset("nano", seed=5)
    third = UniDGModel.from_preset("nano", seed=6)
    assert torch.equal(expected, after)
    weight = "transformer.x_embedder.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], third.state_dict()[weight])
    assert torch.get_default_dtype() == torch.float32


def test_packing_matches_diffusers_and_the_runtime() -> None:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 4, 8, generator=generator)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxFillPipeline._pack_latents(latents, 2, 16, 4, 8))
    assert np.array_equal(packed.numpy(), np_latents.pack_latents(latents.numpy()))
    assert torch.equal(unpack_latents(packed, 2, 4), latents)
    assert torch.equal(unpack_latents(packed, 2, 4), FluxFillPipeline._unpack_latents(packed, 32, 64, 8))
    ids = image_ids(2, 4)
    assert torch.equal(ids, FluxFillPipeline._prepare_latent_image_ids(1, 2, 4, "cpu", torch.float32))
    assert np.array_equal(ids.numpy(), np_latents.image_ids(2, 4))
    mask = torch.rand(2, 1, 32, 64, generator=generator) > 0.5
    assert np.array_equal(pack_mask(mask.float()).numpy(), np_latents.pack_mask(mask.numpy()))


def test_build_condition_is_flux_fill_prepare_mask_latents(nano: UniDGModel) -> None:
    generator = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 32, 64, generator=generator) * 2 - 1
    mask = torch.zeros(2, 1, 32, 64)
    mask[0, :, 4:20, 40:60] = 1
    mask[1, :, 10:30, 33:50] = 1
    with torch.no_grad():
        condition = nano.build_condition(pixels, mask)
        # FluxFillPipeline: masked = image * (1 - mask); VAE latents -> (z - shift) * scale -> pack; mask -> 256.
        raw = nano.vae.encode(pixels * (1 - mask)).latent_dist.mode()
        pipeline = SimpleNamespace(vae=nano.vae, vae_scale_factor=8, _pack_latents=FluxFillPipeline._pack_latents)
        mask_tokens, masked_tokens = FluxFillPipeline.prepare_mask_latents(
            pipeline, mask, raw, 2, 16, 1, 32, 64, torch.float32, "cpu", None
        )
    expected = torch.cat([masked_tokens, mask_tokens], dim=-1)
    assert condition.shape == (2, 8, 320)
    assert (condition - expected).abs().max() <= 1e-6
    # The masked region's pixels do not reach the condition: only the mask channels say what is there.
    changed = torch.where(mask.bool(), -pixels, pixels)
    with torch.no_grad():
        assert (nano.build_condition(changed, mask) - condition).abs().max() <= 1e-6
        assert (nano.build_condition(pixels, mask[:, 0] > 0) - condition).abs().max() == 0


def test_encode_decode_shapes_and_determinism(nano: UniDGModel) -> None:
    pixels = torch.rand(1, 3, 32, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = nano.encode_images(pixels)
        again = nano.encode_images(pixels)
        raw = nano.vae.encode(pixels).latent_dist.mean
        decoded = nano.decode_latents(latents)
    assert latents.shape == (1, 16, 4, 8)
    assert torch.equal(latents, again)
    assert torch.allclose(latents, (raw - 0.1159) * 0.3611)
    assert decoded.shape == pixels.shape


def test_encode_reference_resizes_in_torch_and_runs_redux(nano: UniDGModel) -> None:
    generator = torch.Generator().manual_seed(3)
    reference = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    with torch.no_grad():
        tokens = nano.encode_reference(reference)
        siglip_input = nano.reference_pixels(reference)
        direct = nano.redux(nano.image_encoder(pixel_values=siglip_input).last_hidden_state).image_embeds
    assert tokens.shape == (2, nano.reference_tokens, nano.joint_dim)
    assert siglip_input.shape == (2, 3, 64, 64)
    assert siglip_input.min() >= -1 and siglip_input.max() <= 1  # SigLIP's mean/std 0.5: [-1, 1] stays [-1, 1]
    assert torch.equal(tokens, direct)
    with torch.no_grad():
        at_size = nano.reference_pixels(siglip_input)
    assert torch.equal(at_size, siglip_input)  # already at the encoder's size: no resampling


def test_context_and_velocity(nano: UniDGModel) -> None:
    generator = torch.Generator().manual_seed(4)
    reference_tokens = torch.randn(2, 5, nano.joint_dim, generator=generator)
    folded, folded_ids = nano.context(reference_tokens)
    unfolded, unfolded_ids = nano.context(reference_tokens, fold_text=False)
    assert folded.shape == (2, 6, nano.joint_dim) and folded_ids.shape == (6, 3)
    assert unfolded.shape == (2, 8 + 5, nano.joint_dim) and not unfolded_ids.any()
    assert not folded[:, :1].any() and torch.equal(folded[:, 1:], reference_tokens)
    with pytest.raises(ValueError, match="width"):
        nano.context(torch.zeros(1, 5, 7))

    x = torch.randn(2, 8, 64, generator=generator)
    cond = torch.randn(2, 8, 320, generator=generator)
    ids = image_ids(2, 4)
    k = nano.settings.text_tokens
    bias_folded = torch.zeros(2, 6 + 8)
    bias_folded[:, 0] = math.log(k)
    with torch.no_grad():
        v = nano.velocity(x, cond, folded, bias_folded, 0.5, 1.0, ids, folded_ids)
        v_unfolded = nano(x, cond, unfolded, torch.zeros(2, 13 + 8), torch.tensor(0.5), 1.0, ids, unfolded_ids)
        v_guided = nano.velocity(x, cond, folded, bias_folded, 0.5, 4.0, ids, folded_ids)
        v_later = nano.velocity(x, cond, folded, bias_folded, torch.tensor([0.5, 0.2]), 1.0, ids)
    assert v.shape == (2, 8, 64)
    defect = torch.zeros(2, 8, dtype=torch.bool)
    defect[0, 2] = defect[1, 5] = True
    bias = nano.key_bias(defect)
    assert bias.shape == (2, nano.text_token_count() + nano.reference_tokens + 8) and bias.dtype == torch.float32
    assert bias[0, 0] == pytest.approx(math.log(k)) and bias[1, -3] == pytest.approx(math.log(nano.settings.alpha))
    assert bias.count_nonzero() == 4
    assert not nano.key_bias(defect, fold_text=False, alpha=1.0).any()
    assert (v - v_unfolded).abs().max() <= 1e-5
    assert (v - v_guided).abs().max() > 1e-4  # guidance is an input of the distilled model
    assert torch.equal(v[0], v_later[0]) and (v[1] - v_later[1]).abs().max() > 1e-4


def test_velocity_trains_with_gradient_checkpointing_and_the_key_bias() -> None:
    model = UniDGModel.from_preset("nano", seed=1).train()
    model.transformer.enable_gradient_checkpointing()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 8, 64, generator=generator)
    cond = torch.randn(1, 8, 320, generator=generator)
    ctx, txt_ids = model.context(torch.randn(1, 4, model.joint_dim, generator=generator))
    bias = torch.zeros(1, ctx.shape[1] + 8)
    bias[:, 0] = math.log(model.settings.text_tokens)
    bias[:, -2:] = math.log(2.0)
    loss = model.velocity(x, cond, ctx, bias, 0.4, 1.0, image_ids(2, 4), txt_ids).square().mean()
    loss.backward()
    grads = [p.grad for p in model.transformer.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.transformer.transformer_blocks[0].attn.to_k.weight.grad.abs().sum() > 0
