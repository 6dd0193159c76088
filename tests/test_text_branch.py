"""UniDG-Text in the torch model: instruction features in the text branch behind an explicit option; reference mode
(zero text branch, folded or not) computes exactly what it computed before."""

from __future__ import annotations

import pytest
import torch

from unidg.core.errors import UniDGError
from unidg.train.model import UniDGModel, image_ids
from unidg.train.text_encoders import instruction_corpus, make_text_encoders

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def nano() -> UniDGModel:
    return UniDGModel.from_preset("nano", seed=3)


@pytest.fixture(scope="module")
def inputs(nano: UniDGModel) -> dict:
    generator = torch.Generator().manual_seed(9)
    defect = torch.zeros(2, 8, dtype=torch.bool)
    defect[0, 5] = defect[1, 6] = True
    return {
        "x": torch.randn(2, 8, 64, generator=generator),
        "cond": torch.randn(2, 8, 320, generator=generator),
        "reference": torch.randn(2, nano.reference_tokens, nano.joint_dim, generator=generator),
        "defect": defect,
        "img_ids": image_ids(2, 4),
    }


def _transformer(nano: UniDGModel, inputs: dict, context: torch.Tensor, pooled: torch.Tensor, bias: torch.Tensor):
    """diffusers' transformer called directly, as the model did before the text branch had an option."""
    return nano.transformer(
        hidden_states=torch.cat([inputs["x"], inputs["cond"]], dim=2),
        encoder_hidden_states=context,
        pooled_projections=pooled,
        timestep=torch.full((2,), 0.5),
        img_ids=inputs["img_ids"],
        txt_ids=torch.zeros(context.shape[1], 3),
        guidance=torch.ones(2),
        joint_attention_kwargs={"key_bias": bias},
        return_dict=False,
    )[0]


@pytest.mark.parametrize("fold", [True, False])
def test_reference_mode_is_bit_identical(nano: UniDGModel, inputs: dict, fold: bool) -> None:
    reference = inputs["reference"]
    context, txt_ids = nano.context(reference, fold_text=fold)
    zeros = torch.zeros(2, nano.text_token_count(fold), nano.joint_dim)
    assert torch.equal(context, torch.cat([zeros, reference], dim=1))
    bias = nano.key_bias(inputs["defect"], fold_text=fold)
    with torch.no_grad():
        v = nano.velocity(inputs["x"], inputs["cond"], context, bias, 0.5, 1.0, inputs["img_ids"], txt_ids)
        expected = _transformer(nano, inputs, context, torch.zeros(2, 32), bias)
    assert torch.equal(v, expected)


def test_instruction_features_drive_the_text_branch(nano: UniDGModel, inputs: dict) -> None:
    encoders = make_text_encoders("nano", seed=1)
    encoders.check_transformer(nano.transformer.config.pooled_projection_dim, nano.joint_dim)
    k = nano.settings.text_tokens  # the instruction is encoded at the model's K text tokens
    texts = instruction_corpus(2, seed=3)
    other = ["Add the large, round, brown dent defect to the image."] * 2
    reference = inputs["reference"]
    bias = nano.key_bias(inputs["defect"], fold_text=False)  # real text tokens are never folded
    velocities = []
    with torch.no_grad():
        for batch in (texts, other):
            pooled, hidden = encoders.encode(batch, max_length=k)
            context, txt_ids = nano.context(reference, text_states=hidden)
            assert context.shape == (2, k + nano.reference_tokens, nano.joint_dim)
            assert torch.equal(context[:, :k], hidden) and torch.equal(context[:, k:], reference)
            v = nano.velocity(inputs["x"], inputs["cond"], context, bias, 0.5, 1.0, inputs["img_ids"], txt_ids, pooled)
            assert torch.equal(v, _transformer(nano, inputs, context, pooled, bias))
            velocities.append(v)
        zero_context, zero_ids = nano.context(reference, fold_text=False)
        v_reference = nano.velocity(inputs["x"], inputs["cond"], zero_context, bias, 0.5, 1.0, inputs["img_ids"])
    assert (velocities[0] - velocities[1]).abs().max() > 1e-4
    assert (velocities[0] - v_reference).abs().max() > 1e-4


def test_text_features_refuse_folding_and_wrong_shapes(nano: UniDGModel, inputs: dict) -> None:
    reference = inputs["reference"]
    hidden = torch.zeros(2, nano.settings.text_tokens, nano.joint_dim)
    with pytest.raises(UniDGError, match="folding is exact only"):
        nano.context(reference, fold_text=True, text_states=hidden)
    with pytest.raises(UniDGError, match="expected \\(2, L, 64\\)"):
        nano.context(reference, text_states=torch.zeros(2, 8, 4096))
    context, txt_ids = nano.context(reference, text_states=hidden)
    with pytest.raises(UniDGError, match="pooled of shape"):
        nano.velocity(
            inputs["x"], inputs["cond"], context, None, 0.5, 1.0, inputs["img_ids"], txt_ids, torch.zeros(2, 768)
        )
