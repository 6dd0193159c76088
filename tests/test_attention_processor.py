"""The key-bias attention processor: explicit reference, stock-diffusers equality, exact folding, padding."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import (
    FluxAttention,
    FluxAttnProcessor,
    FluxPosEmbed,
    FluxTransformer2DModel,
)

from unidg.train.attention import (
    KeyBiasAttnProcessor,
    flux_attention_modules,
    install_key_bias_processor,
    set_attention_backend,
)
from unidg.train.model import image_ids
from unidg.train.presets import NANO

HEADS, HEAD_DIM = 4, 32
H_TOKENS, W_TOKENS = 2, 4  # a tiny diptych token grid (S = 32)
N_IMG = H_TOKENS * W_TOKENS
R = 3  # "Redux" tokens


def _rope(num_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.cat([torch.zeros(num_context, 3), image_ids(H_TOKENS, W_TOKENS)])
    return FluxPosEmbed(theta=10000, axes_dim=list(NANO.transformer.axes_dims_rope))(ids)


def _randomize_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    # RMSNorm weights start at 1; make them matter so a skipped norm would show.
    for name, parameter in module.named_parameters():
        if "norm" in name:
            parameter.data = 1 + 0.3 * torch.randn(parameter.shape, generator=generator)


def _reference_attention(attn, hidden, context, rope, bias) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(QKᵀ/√d + b[key]) V written out: projections, RMS-norms, RoPE, explicit softmax."""

    def heads(t):
        return t.unflatten(-1, (HEADS, HEAD_DIM))

    q = attn.norm_q(heads(attn.to_q(hidden)))
    k = attn.norm_k(heads(attn.to_k(hidden)))
    v = heads(attn.to_v(hidden))
    if context is not None:
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(context))), q], dim=1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(context))), k], dim=1)
        v = torch.cat([heads(attn.add_v_proj(context)), v], dim=1)
    q = apply_rotary_emb(q, rope, sequence_dim=1).double()
    k = apply_rotary_emb(k, rope, sequence_dim=1).double()
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HEAD_DIM) + bias.double()[:, None, None, :]
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v.double()).flatten(2).float()
    if context is None:
        return out, None
    ctx_out, img_out = out[:, : context.shape[1]], out[:, context.shape[1] :]
    return attn.to_out[0](img_out), attn.to_add_out(ctx_out)


@pytest.mark.parametrize("double", [True, False], ids=["double-block", "single-block"])
def test_processor_equals_explicit_softmax_with_bias(double: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    dim = HEADS * HEAD_DIM
    if double:
        attn = FluxAttention(dim, HEADS, HEAD_DIM, bias=True, added_kv_proj_dim=dim, out_dim=dim, eps=1e-6)
    else:
        attn = FluxAttention(dim, HEADS, HEAD_DIM, bias=True, out_dim=dim, eps=1e-6, pre_only=True)
    _randomize_norms(attn, generator)
    num_context = 1 + R
    batch = 2
    bias = torch.zeros(batch, num_context + N_IMG)
    bias[:, 0] = math.log(8)
    bias[0, num_context + 1 : num_context + 4] = math.log(2)
    bias[1, num_context + 5] = math.log(3)
    bias[1, 2] = -math.inf  # a padded context key
    rope = _rope(num_context)
    attn.set_processor(KeyBiasAttnProcessor())
    with torch.no_grad():
        if double:
            hidden = torch.randn(batch, N_IMG, dim, generator=generator)
            context = torch.randn(batch, num_context, dim, generator=generator)
            out, ctx_out = attn(hidden, context, image_rotary_emb=rope, key_bias=bias)
            ref, ref_ctx = _reference_attention(attn, hidden, context, rope, bias)
            assert (ctx_out - ref_ctx).abs().max() < 1e-5
        else:
            hidden = torch.randn(batch, num_context + N_IMG, dim, generator=generator)
            out = attn(hidden, image_rotary_emb=rope, key_bias=bias)
            ref, _ = _reference_attention(attn, hidden, None, rope, bias)
        error = (out - ref).abs().max().item()
        unbiased = attn(hidden, context, image_rotary_emb=rope) if double else attn(hidden, image_rotary_emb=rope)
    if double:
        unbiased = unbiased[0]
    assert error < 1e-5, error
    assert (unbiased - ref).abs().max() > 1e-3  # the bias really changes the result


def _tiny_transformer(seed: int = 0) -> FluxTransformer2DModel:
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**NANO.transformer.config()).eval()
    _randomize_norms(transformer, torch.Generator().manual_seed(seed))
    return transformer


def _inputs(num_text: int, batch: int = 2, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    config = NANO.transformer
    redux = torch.randn(batch, R, config.joint_attention_dim, generator=generator)
    text = torch.zeros(batch, num_text, config.joint_attention_dim)
    return dict(
        hidden_states=torch.randn(batch, N_IMG, config.in_channels, generator=generator),
        encoder_hidden_states=torch.cat([text, redux], dim=1),
        pooled_projections=torch.zeros(batch, config.pooled_projection_dim),
        timestep=torch.tensor([0.7, 0.3]),
        guidance=torch.tensor([1.0, 30.0]),
        img_ids=image_ids(H_TOKENS, W_TOKENS),
        txt_ids=torch.zeros(num_text + R, 3),
        return_dict=False,
    )


def _defect_bias(batch: int = 2) -> torch.Tensor:
    bias = torch.zeros(batch, N_IMG)
    bias[:, [1, 2, 5, 6]] = math.log(2.0)  # reference-defect keys (left half) and target keys (right half)
    return bias


def test_folding_k_zero_text_tokens_is_exact_on_the_whole_transformer() -> None:
    transformer = _tiny_transformer()
    install_key_bias_processor(transformer)
    k = 8
    image_bias = _defect_bias()
    with torch.no_grad():
        full_bias = torch.cat([torch.zeros(2, k + R), image_bias], dim=1)
        unfolded = transformer(**_inputs(k), joint_attention_kwargs={"key_bias": full_bias})[0]
        folded_bias = torch.cat([torch.full((2, 1), math.log(k)), torch.zeros(2, R), image_bias], dim=1)
        folded = transformer(**_inputs(1), joint_attention_kwargs={"key_bias": folded_bias})[0]
        one_token = torch.cat([torch.zeros(2, 1 + R), image_bias], dim=1)
        not_reweighted = transformer(**_inputs(1), joint_attention_kwargs={"key_bias": one_token})[0]
    error = (unfolded - folded).abs().max().item()
    print(f"folding max abs diff (fp32, K={k}): {error:.3e}, output max {unfolded.abs().max():.2f}")
    assert error <= 1e-5
    # In float64 the difference shrinks to rounding; diffusers' RoPE still rounds q and k to float32
    # (apply_rotary_emb computes in x.float()), so it stays at float32-ulp level, far below the fp32 figure.
    transformer.double()
    with torch.no_grad():
        as64 = {
            name: value.double() if value.is_floating_point() else value
            for name, value in _inputs(k).items()
            if isinstance(value, torch.Tensor)
        }
        unfolded64 = transformer(**{**_inputs(k), **as64}, joint_attention_kwargs={"key_bias": full_bias.double()})[0]
        as64 = {name: value.double() for name, value in _inputs(1).items() if isinstance(value, torch.Tensor)}
        folded64 = transformer(**{**_inputs(1), **as64}, joint_attention_kwargs={"key_bias": folded_bias.double()})[0]
    error64 = (unfolded64 - folded64).abs().max().item()
    print(f"folding max abs diff (fp64): {error64:.3e}")
    assert error64 <= 1e-7
    assert (unfolded - not_reweighted).abs().max() > 1e-3  # without log K the single token is not equivalent


def test_zero_bias_matches_stock_flux_processor_on_the_whole_transformer() -> None:
    transformer = _tiny_transformer()
    inputs = _inputs(4)
    with torch.no_grad():
        transformer.set_attn_processor(FluxAttnProcessor())
        stock = transformer(**inputs)[0]
        install_key_bias_processor(transformer)
        no_bias = transformer(**inputs)[0]
        zero_bias = transformer(**inputs, joint_attention_kwargs={"key_bias": torch.zeros(2, 4 + R + N_IMG)})[0]
        defect = torch.cat([torch.zeros(2, 4 + R), _defect_bias()], dim=1)
        biased = transformer(**inputs, joint_attention_kwargs={"key_bias": defect})[0]
    print(
        f"stock vs key-bias processor: no bias {(stock - no_bias).abs().max():.3e}, "
        f"zero bias {(stock - zero_bias).abs().max():.3e}"
    )
    assert torch.equal(stock, no_bias)
    assert (stock - zero_bias).abs().max() <= 1e-5
    assert (stock - biased).abs().max() > 1e-3


def test_padded_context_keys_with_minus_inf_change_nothing_for_image_tokens() -> None:
    transformer = _tiny_transformer()
    install_key_bias_processor(transformer)
    inputs = _inputs(1)
    bias = torch.cat([torch.zeros(2, 1 + R), _defect_bias()], dim=1)
    padded = dict(inputs)
    padding = torch.randn(2, 3, NANO.transformer.joint_attention_dim)
    padded["encoder_hidden_states"] = torch.cat([inputs["encoder_hidden_states"], padding], dim=1)
    padded["txt_ids"] = torch.zeros(1 + R + 3, 3)
    padded_bias = torch.cat([bias[:, : 1 + R], torch.full((2, 3), -math.inf), bias[:, 1 + R :]], dim=1)
    with torch.no_grad():
        plain = transformer(**inputs, joint_attention_kwargs={"key_bias": bias})[0]
        masked = transformer(**padded, joint_attention_kwargs={"key_bias": padded_bias})[0]
        unmasked_bias = torch.cat([bias[:, : 1 + R], torch.zeros(2, 3), bias[:, 1 + R :]], dim=1)
        unmasked = transformer(**padded, joint_attention_kwargs={"key_bias": unmasked_bias})[0]
    assert (plain - masked).abs().max() <= 1e-5
    assert (plain - unmasked).abs().max() > 1e-3


def test_processor_is_installed_on_every_block_and_validates_its_inputs() -> None:
    transformer = _tiny_transformer()
    processor = install_key_bias_processor(transformer)
    modules = flux_attention_modules(transformer)
    assert len(modules) == NANO.transformer.num_layers + NANO.transformer.num_single_layers
    assert all(attn.processor is processor for attn in modules)
    with torch.no_grad(), pytest.raises(ValueError, match="key_bias must have shape"):
        transformer(**_inputs(1), joint_attention_kwargs={"key_bias": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="unknown attention backend"):
        KeyBiasAttnProcessor("flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(transformer, "flash")
    transformer.set_attn_processor(FluxAttnProcessor())
    with pytest.raises(ValueError, match="install_key_bias_processor"):
        set_attention_backend(transformer, "sdpa")


def test_headdim_fold_backend_matches_sdpa() -> None:
    if importlib.util.find_spec("unidg.train.headdim_fold") is None:
        pytest.skip("unidg.train.headdim_fold (head-dim fold fallback) is not in this build")
    transformer = _tiny_transformer()
    install_key_bias_processor(transformer)
    bias = torch.cat([torch.full((2, 1), math.log(8)), torch.zeros(2, R), _defect_bias()], dim=1)
    with torch.no_grad():
        sdpa = transformer(**_inputs(1), joint_attention_kwargs={"key_bias": bias})[0]
        set_attention_backend(transformer, "headdim_fold")
        folded = transformer(**_inputs(1), joint_attention_kwargs={"key_bias": bias})[0]
    assert (sdpa - folded).abs().max() <= 1e-4
