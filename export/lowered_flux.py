"""The FLUX transformer rewritten for the step graph: the same weights and arithmetic as diffusers'
``FluxTransformer2DModel`` (with the key-bias attention of ``unidg.train.attention``), in fewer, larger kernels.

Where diffusers' forward, traced as it is, costs onnxruntime about 100 kernels per block (a Reshape pair around every
3-D Gemm, the RoPE rotation as Unsqueeze/Squeeze/Split/Neg/Concat chains, a concatenation and split of the two
streams in every single block), this module computes the same velocity with:

- token-major activations: at batch 1 every stream is a 2-D ``[tokens, D]`` matrix, so each linear layer is one
  Gemm; a batch larger than 1 keeps ``[B, tokens, D]``;
- one matmul per projection group: Q, K and V of a stream (and a single block's MLP input with them) as one Gemm,
  split into heads by views, Q and K each through its own RMSNorm as trained;
- every block's AdaLN modulation from one Gemm on ``silu(temb)`` (it depends on the step, not on the block), with
  the ``1 +`` of each scale folded into that Gemm's bias;
- RoPE from (cos, sin) tables computed once per step: one ONNX ``RotaryEmbedding`` operator per Q and per K
  (``rope="op"``), or, for runtimes without it, the elementwise rotation of diffusers (``rope="elementwise"``);
- the attention mask broadcast once per step, not once per block; the two streams joined once before the single
  blocks and split once after them.

Outputs equal diffusers' to float rounding (fp32: the order of a few additions and the fused ``1 +``);
``tests/test_lowered_flux.py`` checks that against ``UniDGModel.velocity`` for every attention and RoPE form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unidg.train.attention import _key_bias_mask
from unidg.train.headdim_fold import folded_attention
from unidg.train.model import UniDGModel

ROPE_FORMS = ("op", "elementwise")
# The attention forms it is traced in: the ONNX exporter's two portable masks, and the key-only mask of the torch
# programs (the torch backend's --fused-attention rewrites that SDPA call).
ATTENTION_FORMS = ("expand", "fold", "key")
NORM_EPS = 1e-6  # FLUX's LayerNorm and QK RMSNorm epsilon


def _qkv_weights(attn: nn.Module, context: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One stream's Q, K, V projections as one (weight, bias), rows [Q; K; V]."""
    if getattr(attn, "fused_projections", False):
        layer = attn.to_added_qkv if context else attn.to_qkv
        return layer.weight.detach(), layer.bias.detach()
    names = ("add_q_proj", "add_k_proj", "add_v_proj") if context else ("to_q", "to_k", "to_v")
    layers = [getattr(attn, name) for name in names]
    return torch.cat([layer.weight.detach() for layer in layers]), torch.cat([layer.bias.detach() for layer in layers])


@dataclass(frozen=True)
class _Conditioning:
    """Per step, shared by every block: modulation chunks, RoPE tables, attention mask or bias, batch."""

    chunks: tuple[torch.Tensor, ...]
    rope: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None
    batch: int


def _static_one(batch) -> bool:
    """A static batch of 1 runs on 2-D token matrices; a symbolic batch (dynamic export) is not compared with 1, which
    would specialise it."""
    return isinstance(batch, int) and batch == 1


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


@dataclass(frozen=True)
class _Modulation:
    """Where each block's (shift, scale, gate) chunks sit in the one modulation Gemm's output."""

    sizes: tuple[int, ...]
    first_chunk: dict[int, int]  # block index -> its first chunk (double: image 6, then context 6; single: 3)
    out: int | None  # first chunk of the output norm (scale, shift); None when the range stops before the end


class LoweredFlux(nn.Module):
    """velocity(x, cond, ctx, key_bias, sigma, guidance, img_ids, txt_ids[, pooled]) as ``UniDGModel.velocity``.

    ``attention``: ``"expand"`` (the per-key bias as a float mask ``[B, 1, S, S]``, onnxruntime's form), ``"fold"``
    (folded into an extra head dimension, ``unidg.train.headdim_fold``) or ``"key"`` (the key-only mask
    ``[B, 1, 1, S]`` torch's SDPA broadcasts: the torch programs). ``rope``: see the module doc.
    ``blocks``: (first, stop) of the blocks it runs (double blocks first), for the step-cache head and tail; the
    whole transformer by default. The fused weights are copies: about 40 % of the blocks' weights in memory.
    """

    def __init__(
        self, model: UniDGModel, attention: str = "expand", rope: str = "op", blocks: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        if attention not in ATTENTION_FORMS:
            raise ValueError(f"attention form {attention!r}: choose one of {list(ATTENTION_FORMS)}")
        if rope not in ROPE_FORMS:
            raise ValueError(f"rope form {rope!r}: choose one of {list(ROPE_FORMS)}")
        transformer = model.transformer
        # Not a submodule: the model's own weights (embedders, feed-forwards, output projections, used as they are)
        # keep their names ``model.*`` in a graph whose module registers the model, as every bundle graph does.
        object.__setattr__(self, "model", model)
        self.attention_form = attention
        self.rope_form = rope
        self.heads = int(transformer.config.num_attention_heads)
        self.head_dim = int(transformer.config.attention_head_dim)
        self.dim = self.heads * self.head_dim
        self.guidance_embeds = bool(transformer.config.guidance_embeds)
        self.pooled_dim = int(transformer.config.pooled_projection_dim)
        self.doubles = len(transformer.transformer_blocks)
        self.total_blocks = self.doubles + len(transformer.single_transformer_blocks)
        self.blocks = (0, self.total_blocks) if blocks is None else blocks
        if not 0 <= self.blocks[0] < self.blocks[1] <= self.total_blocks:
            raise ValueError(f"blocks {blocks!r}: a range within the transformer's {self.total_blocks} blocks")
        self._fuse_projections(transformer)
        self._fuse_modulation(transformer)
        self.register_buffer("rope_frequencies", self._rope_frequencies(transformer), persistent=False)

    # ------------------------------------------------------------------------------------------------ weights
    def _block_range(self) -> range:
        return range(*self.blocks)

    def _fuse_projections(self, transformer: nn.Module) -> None:
        """The blocks' fused input projections, by block index: a double block's image and context Q/K/V; a single
        block's Q, K, V and MLP input (they read the same normalised tokens), rows [Q; K; V; MLP]."""
        self.projections = nn.ModuleDict()
        for index in self._block_range():
            if index < self.doubles:
                attn = transformer.transformer_blocks[index].attn
                self.projections[str(index)] = _linear(*_qkv_weights(attn, context=False))
                self.projections[f"{index}_context"] = _linear(*_qkv_weights(attn, context=True))
            else:
                block = transformer.single_transformer_blocks[index - self.doubles]
                weight, bias = _qkv_weights(block.attn, context=False)
                weight = torch.cat([weight, block.proj_mlp.weight.detach()])
                bias = torch.cat([bias, block.proj_mlp.bias.detach()])
                self.projections[str(index)] = _linear(weight, bias)

    def _fuse_modulation(self, transformer: nn.Module) -> None:
        """The AdaLN linears of the blocks in range (and of the output norm after the last block) in one (weight,
        bias); each scale chunk's bias gets the ``1 +`` of ``x * (1 + scale)``."""
        weights, biases, sizes, first_chunk = [], [], [], {}
        dim = self.dim

        def add(linear: nn.Linear, scale_chunks: tuple[int, ...]) -> int:
            first = len(sizes)
            bias = linear.bias.detach().clone()
            for chunk in scale_chunks:
                bias[chunk * dim : (chunk + 1) * dim] += 1
            weights.append(linear.weight.detach())
            biases.append(bias)
            sizes.extend([dim] * (linear.weight.shape[0] // dim))
            return first

        for index in self._block_range():
            if index < self.doubles:
                block = transformer.transformer_blocks[index]
                # AdaLayerNormZero chunks, image then context: shift_msa, scale_msa, gate_msa, shift, scale, gate (mlp)
                first_chunk[index] = add(block.norm1.linear, (1, 4))
                add(block.norm1_context.linear, (1, 4))
            else:
                block = transformer.single_transformer_blocks[index - self.doubles]
                first_chunk[index] = add(block.norm.linear, (1,))  # shift, scale, gate
        out = None
        if self.blocks[1] == self.total_blocks:
            out = add(transformer.norm_out.linear, (0,))  # AdaLayerNormContinuous: scale, shift
        self.modulation_weight = nn.Parameter(torch.cat(weights), requires_grad=False)
        self.modulation_bias = nn.Parameter(torch.cat(biases), requires_grad=False)
        self.modulation = _Modulation(tuple(sizes), first_chunk, out)

    def _rope_frequencies(self, transformer: nn.Module) -> torch.Tensor:
        """(3, d/2) float32: angle = ids @ F, one axis' inverse frequencies in its columns, zeros elsewhere (exact:
        each angle is one product, as diffusers' outer product computes it)."""
        pos_embed = transformer.pos_embed
        axes_dim = list(pos_embed.axes_dim)
        table = torch.zeros(len(axes_dim), sum(axes_dim) // 2, dtype=torch.float32)
        column = 0
        for axis, dim in enumerate(axes_dim):
            inverse = 1.0 / (pos_embed.theta ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
            table[axis, column : column + dim // 2] = inverse
            column += dim // 2
        return table

    # ------------------------------------------------------------------------------------------------ pieces
    def tokens(self, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        """[B, n, C] -> the token layout: [n, C] at batch 1, unchanged otherwise."""
        return tensor.reshape(tensor.shape[1], tensor.shape[2]) if _static_one(batch) else tensor

    def unsplit(self, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        """The token layout -> [B, n, C]."""
        return tensor.reshape(1, tensor.shape[0], tensor.shape[1]) if _static_one(batch) else tensor

    def _layer_norm(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), eps=NORM_EPS)

    def _rope_tables(self, img_ids: torch.Tensor, txt_ids: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
        angles = torch.cat((txt_ids, img_ids), dim=0).float() @ self.rope_frequencies  # (S, d/2)
        cos, sin = torch.cos(angles), torch.sin(angles)
        if self.rope_form == "op":  # RotaryEmbedding's caches: (B, S, d/2)
            return cos[None].expand(batch, -1, -1), sin[None].expand(batch, -1, -1)
        # diffusers' tables repeat each angle for the pair; the sign of the rotation goes into sin
        cos = cos.repeat_interleave(2, dim=-1)
        sign = torch.tensor([-1.0, 1.0]).repeat(self.head_dim // 2)
        return cos, sin.repeat_interleave(2, dim=-1) * sign

    def _rotate(self, x: torch.Tensor, tables: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """RoPE on (B, H, S, d) in float32, as diffusers' apply_rotary_emb (interleaved pairs)."""
        dtype = x.dtype
        x = x.float()
        cos, sin = tables
        if self.rope_form == "op":
            rotated = torch.onnx.ops.rotary_embedding(x, cos, sin, interleaved=True)
        else:
            swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (a, b) -> (b, a); sin carries the (-, +) signs
            rotated = x * cos + swapped * sin
        return rotated.to(dtype)

    def _attention_bias(self, key_bias: torch.Tensor | None, batch: int, keys: int) -> torch.Tensor | None:
        """What every attention of the step receives, computed once: the float mask or the per-key bias."""
        if key_bias is None:
            return None
        mask = _key_bias_mask(key_bias, batch, keys, torch.float32)  # (B, 1, 1, S), validated
        if self.attention_form == "fold":
            return mask[:, 0, 0, :].expand(batch, -1)
        if self.attention_form == "key":
            return mask.to(self.model.dtype)
        return mask.to(self.model.dtype).expand(batch, 1, keys, keys)

    def _attend(self, q, k, v, rope: tuple, bias: torch.Tensor | None) -> torch.Tensor:
        """Normalised q, k and v (B, S, H, d) -> attention output (B, S, H * d)."""
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self._rotate(q, rope), self._rotate(k, rope)
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.attention_form == "fold":
            out = folded_attention(q, k, v, bias)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2).flatten(2, 3).to(q.dtype)

    def _project(self, x: torch.Tensor, linear: nn.Linear, attn: nn.Module, batch, tokens, context: bool = False):
        """Tokens -> normalised q, k and v, each (B, n, H, d), [and the MLP input of a single block]."""
        out = linear(x)
        width = self.dim
        sizes = [width, width, width] + ([out.shape[-1] - 3 * width] if out.shape[-1] > 3 * width else [])
        parts = out.split(sizes, dim=-1)
        q, k, v = (part.reshape(batch, tokens, self.heads, self.head_dim) for part in parts[:3])
        norm_q, norm_k = (attn.norm_added_q, attn.norm_added_k) if context else (attn.norm_q, attn.norm_k)
        return norm_q(q), norm_k(k), v, (parts[3] if len(parts) > 3 else None)

    def _joint_tokens(self, attention: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, S, D) attention output -> the token layout."""
        return attention.reshape(attention.shape[1], attention.shape[2]) if _static_one(batch) else attention

    # ------------------------------------------------------------------------------------------------ blocks
    def _double_block(self, index, img, ctx, chunks, rope, bias, batch):
        block = self.model.transformer.transformer_blocks[index]
        first = self.modulation.first_chunk[index]
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = chunks[first : first + 6]
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = chunks[first + 6 : first + 12]
        tokens, context = img.shape[-2], ctx.shape[-2]
        attn = block.attn
        q, k, v, _ = self._project(
            self._layer_norm(img) * scale + shift, self.projections[str(index)], attn, batch, tokens
        )
        c_q, c_k, c_v, _ = self._project(
            self._layer_norm(ctx) * c_scale + c_shift, self.projections[f"{index}_context"], attn, batch, context, True
        )
        joint = self._attend(*(torch.cat(pair, dim=1) for pair in ((c_q, q), (c_k, k), (c_v, v))), rope, bias)
        c_attention, attention = self._joint_tokens(joint, batch).split([context, tokens], dim=-2)
        img = img + gate * attn.to_out[0](attention)
        img = img + gate_mlp * block.ff(self._layer_norm(img) * scale_mlp + shift_mlp)
        ctx = ctx + c_gate * attn.to_add_out(c_attention)
        ctx = ctx + c_gate_mlp * block.ff_context(self._layer_norm(ctx) * c_scale_mlp + c_shift_mlp)
        if ctx.dtype == torch.float16:
            ctx = ctx.clip(-65504, 65504)
        return img, ctx

    def _single_block(self, index, joint, chunks, rope, bias, batch):
        block = self.model.transformer.single_transformer_blocks[index - self.doubles]
        first = self.modulation.first_chunk[index]
        shift, scale, gate = chunks[first : first + 3]
        q, k, v, mlp = self._project(
            self._layer_norm(joint) * scale + shift, self.projections[str(index)], block.attn, batch, joint.shape[-2]
        )
        attention = self._joint_tokens(self._attend(q, k, v, rope, bias), batch)
        joint = joint + gate * block.proj_out(torch.cat([attention, block.act_mlp(mlp)], dim=-1))
        if joint.dtype == torch.float16:
            joint = joint.clip(-65504, 65504)
        return joint

    # ------------------------------------------------------------------------------------------------ a step
    def embed(self, x, cond, ctx, sigma, guidance, pooled=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs -> (image tokens, context tokens, temb (B, D)), in the token layout and the model's dtype."""
        transformer = self.model.transformer
        dtype = self.model.dtype
        batch = x.shape[0]
        sigma = sigma.float().reshape(-1).expand(batch)
        if pooled is None:
            pooled = torch.zeros(batch, self.pooled_dim, device=x.device, dtype=dtype)
        img = transformer.x_embedder(self.tokens(torch.cat([x.to(dtype), cond.to(dtype)], dim=2), batch))
        timestep = sigma.to(dtype) * 1000
        if self.guidance_embeds:
            guidance = guidance.float().reshape(-1).expand(batch).to(dtype) * 1000
            temb = transformer.time_text_embed(timestep, guidance, pooled.to(dtype))
        else:
            temb = transformer.time_text_embed(timestep, pooled.to(dtype))
        return img, transformer.context_embedder(self.tokens(ctx.to(dtype), batch)), temb

    def conditioning(self, temb, key_bias, img_ids, txt_ids) -> _Conditioning:
        """What every block of the step reads, computed once."""
        batch = temb.shape[0]
        modulation = F.linear(F.silu(temb), self.modulation_weight, self.modulation_bias)
        if not _static_one(batch):
            modulation = modulation[:, None]  # (B, 1, M): broadcast over each element's tokens
        keys = txt_ids.shape[0] + img_ids.shape[0]
        return _Conditioning(
            chunks=modulation.split(list(self.modulation.sizes), dim=-1),
            rope=self._rope_tables(img_ids, txt_ids, batch),
            bias=self._attention_bias(key_bias, batch, keys),
            batch=batch,
        )

    def run_blocks(self, img, context, cond: _Conditioning):
        """The blocks in range (double blocks first, then single blocks) -> (image, context tokens); the streams are
        joined once on entering the single blocks and split once on leaving them."""
        start, stop = self.blocks
        doubles = self.doubles
        for index in range(start, min(stop, doubles)):
            img, context = self._double_block(index, img, context, cond.chunks, cond.rope, cond.bias, cond.batch)
        if stop > doubles:
            context_tokens = context.shape[-2]
            joint = torch.cat([context, img], dim=-2)
            for index in range(max(start, doubles), stop):
                joint = self._single_block(index, joint, cond.chunks, cond.rope, cond.bias, cond.batch)
            context, img = joint.split([context_tokens, joint.shape[-2] - context_tokens], dim=-2)
        return img, context

    def velocity_out(self, img: torch.Tensor, cond: _Conditioning) -> torch.Tensor:
        """Final image tokens -> velocity (B, N, 64) (a range that runs to the last block)."""
        scale, shift = cond.chunks[self.modulation.out : self.modulation.out + 2]
        velocity = self.model.transformer.proj_out(self._layer_norm(img) * scale + shift)
        return self.unsplit(velocity, cond.batch)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        ctx: torch.Tensor,
        key_bias: torch.Tensor | None,
        sigma: torch.Tensor,
        guidance: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity (B, N, 64) in the transformer's dtype, with ``UniDGModel.velocity``'s inputs."""
        img, context, temb = self.embed(x, cond, ctx, sigma, guidance, pooled)
        conditioning = self.conditioning(temb, key_bias, img_ids, txt_ids)
        img, _ = self.run_blocks(img, context, conditioning)
        return self.velocity_out(img, conditioning)
