"""Tiny random UniDG models and their outputs, shared by the weights-folder tests (loading, import, LoRA files)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from unidg.train.model import UniDGModel, image_ids
from unidg.train.presets import NANO


def random_nano(seed: int = 7) -> UniDGModel:
    """The nano preset with every tensor perturbed: norm weights start at 1 and some biases at 0, so a mis-mapped
    key would go unnoticed without it."""
    model = UniDGModel.from_preset("nano", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


def model_outputs(model: UniDGModel) -> dict[str, torch.Tensor]:
    """Every network's output on a fixed probe: condition (VAE encoder), context (SigLIP + Redux), velocity
    (transformer), decoded pixels (VAE decoder)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 32, 64, generator=generator) * 2 - 1
    mask = torch.zeros(1, 1, 32, 64)
    mask[..., 8:24, 40:56] = 1
    with torch.no_grad():
        cond = model.build_condition(pixels, mask)
        ctx, txt_ids = model.context(model.encode_reference(pixels[..., :32]))
        bias = torch.zeros(1, ctx.shape[1] + 8)
        bias[:, 0] = math.log(model.settings.text_tokens)
        x = torch.randn(1, 8, 64, generator=generator)
        velocity = model.velocity(x, cond, ctx, bias, 0.6, 1.0, image_ids(2, 4), txt_ids)
        decoded = model.decode_latents(torch.randn(1, 16, 4, 8, generator=generator))
    return {"cond": cond, "ctx": ctx, "velocity": velocity, "decoded": decoded}


def assert_same_model(loaded: UniDGModel, original: UniDGModel, atol: float = 0.0) -> dict[str, float]:
    """Same tensors under the same names, and outputs within ``atol`` (0: bit-identical); returns the max abs
    difference of each output. Equal weights can still round differently: a GEMM kernel may pick another path for
    a tensor at another memory alignment (safetensors' buffers), ~5e-7 on the nano velocity."""
    expected = original.state_dict()
    actual = loaded.state_dict()
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(actual[key], tensor), key
    out, ref = model_outputs(loaded), model_outputs(original)
    differences = {name: float((out[name] - ref[name]).abs().max()) for name in ref}
    for name, difference in differences.items():
        assert difference <= atol, (name, difference)
    return differences


# The nano model with a 512-wide transformer (~210 MB in float32): big enough to measure streaming, small enough to
# write in a second.
WIDE = replace(
    NANO,
    name="wide",
    transformer=replace(NANO.transformer, num_layers=4, attention_head_dim=128, axes_dims_rope=(16, 56, 56)),
)
