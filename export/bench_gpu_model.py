"""The model both GPU benchmarks build (``unidg bench gpu`` and ``--all``) and its switches: the dry-run preset, the
fused biased-attention processor, regional compilation, and the step inputs at one token layout."""

from __future__ import annotations

from dataclasses import dataclass, replace

from unidg.core.layout import DiptychLayout
from unidg.runtime.backends.torch_step_options import fused_sdpa
from unidg.train.attention import KeyBiasAttnProcessor, _key_bias_mask, flux_attention_modules
from unidg.train.model import image_ids
from unidg.train.presets import NANO

DRY_RUN_RESOLUTION = 32  # 8 image + 16 Redux + 1 folded text token (8 unfolded)
DRY_RUN_STEPS = 2  # each interpreted kernel call takes ~0.1-1 s on the CPU


def dry_run_preset():
    """The nano preset cut to one double and one single block and a 32-pixel reference (16 Redux tokens): every
    path of the model at a size the Triton interpreter runs in seconds."""
    return replace(
        NANO,
        name="nano-dry-run",
        transformer=replace(NANO.transformer, num_layers=1, num_single_layers=1),
        image_encoder=replace(NANO.image_encoder, image_size=32),
    )


def fused_key_bias_processor():
    """The key-bias attention processor (same projections, RoPE, token order) with its attention on the Triton
    kernel through ``fused_sdpa``, the function the torch backend's ``--fused-attention`` puts in exported graphs."""

    class FusedKeyBiasAttnProcessor(KeyBiasAttnProcessor):
        def attention(self, query, key, value, key_bias):
            mask = None if key_bias is None else _key_bias_mask(key_bias, query.shape[0], key.shape[2], query.dtype)
            return fused_sdpa(query, key, value, attn_mask=mask)

    return FusedKeyBiasAttnProcessor()


def use_fused_attention(transformer) -> int:
    """Install the fused key-bias processor on every double and single block; returns how many."""
    processor = fused_key_bias_processor()
    modules = flux_attention_modules(transformer)
    for attn in modules:
        attn.set_processor(processor)
    return len(modules)


def compile_blocks(torch, transformer, backend: str) -> int:
    """Regional compilation: ``torch.compile`` each double and single block (identical blocks share their code)."""
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


@dataclass
class Workload:
    """The step inputs at one token layout, on the device (float32 like the bundle's graphs)."""

    inputs: tuple
    tokens: int
    image_tokens: int
    context_tokens: int


def make_workload(torch, model, resolution: int, fold: bool, seed: int) -> Workload:
    device = model.device
    generator = torch.Generator().manual_seed(seed)
    layout = DiptychLayout(resolution)
    n_image = layout.image_tokens
    x = torch.randn(1, n_image, 64, generator=generator)
    cond = torch.randn(1, n_image, 320, generator=generator)
    redux = torch.randn(1, model.reference_tokens, model.joint_dim, generator=generator)
    defect = torch.rand(1, n_image, generator=generator) < 0.1
    with torch.inference_mode():
        ctx, txt_ids = model.context(redux, fold_text=fold)
        key_bias = model.key_bias(defect, fold_text=fold)
    img_ids = image_ids(*layout.token_hw)
    sigma, sigma_next, guidance = torch.tensor([0.8]), torch.tensor([0.75]), torch.tensor([1.0])
    inputs = (x, cond, ctx, key_bias, sigma, sigma_next, guidance, img_ids, txt_ids)
    inputs = tuple(t.to(device=device, dtype=torch.float32) for t in inputs)
    return Workload(inputs, ctx.shape[1] + n_image, n_image, ctx.shape[1])
