"""FP8 on the FLUX transformer the way that pays, swapped in and out in place (``unidg bench gpu --all``'s FP8 rows)."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

from unidg.runtime.backends.torch_step_options import _module_fp8_linear_class

# Modules of a block that FP8 leaves in bf16: AdaLN modulation (one row per sample: reading the weight is the cost,
# and a per-call dequantization would cost more than FP8 saves).
MODULATION = ("norm1.linear", "norm1_context.linear", "norm.linear")


class Fp8Transformer:
    """FP8 on the transformer, the way that pays: Q/K/V of each double-block stream as one matmul, a single block's
    Q/K/V and MLP-in as one matmul, every other block linear in E4M3 (row-wise scales, ``fp8_linear``); the AdaLN
    modulation, embedders and the final layer stay bf16. Activation quantization is a per-token amax and cast right
    before each matmul, which Inductor fuses into the op that produces the activation when the blocks are compiled.

    ``apply()`` swaps the FP8 modules in and moves the bf16 originals to the host (so peak GPU memory is the FP8
    model's); ``restore()`` puts them back.
    """

    def __init__(self, transformer, torch) -> None:
        self.transformer, self.torch = transformer, torch
        self.device = next(transformer.parameters()).device
        self.active = False
        self._undo: list[Callable[[], None]] = []
        self.quantized = 0

    def _fp8(self, weight, bias):
        torch = self.torch
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        linear.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.quantized += 1
        return _module_fp8_linear_class()(linear)

    def _offload(self, module) -> None:
        module.to("cpu")
        self._undo.append(lambda: module.to(self.device))

    def _swap(self, parent, attribute: str, new) -> None:
        old = getattr(parent, attribute)
        setattr(parent, attribute, new)
        old.to("cpu")

        def undo() -> None:
            setattr(parent, attribute, old.to(self.device))

        self._undo.append(undo)

    def _swap_linear(self, parent, attribute: str) -> None:
        old = getattr(parent, attribute)
        self._swap(parent, attribute, self._fp8(old.weight.detach(), None if old.bias is None else old.bias.detach()))

    def _fuse(self, owner, names: tuple[str, ...], fused_name: str):
        torch = self.torch
        parts = [getattr(owner, name) for name in names]
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
        fused = self._fp8(weight, bias)
        del weight, bias
        for part in parts:
            self._offload(part)
        setattr(owner, fused_name, fused)
        self._undo.append(lambda: delattr(owner, fused_name))
        return fused

    def apply(self) -> None:
        if self.active:
            return
        try:
            self._apply()
        except BaseException:  # a failure (or the budget's alarm) half-way: put back what was swapped
            self.active = True
            self.restore()
            raise
        self.active = True

    def _apply(self) -> None:
        torch = self.torch
        with torch.no_grad():
            for block in self.transformer.transformer_blocks:
                attn = block.attn
                self._fuse(attn, ("to_q", "to_k", "to_v"), "to_qkv")
                self._fuse(attn, ("add_q_proj", "add_k_proj", "add_v_proj"), "to_added_qkv")
                self._set_fused(attn)
                self._swap_linear(attn.to_out, "0")
                self._swap_linear(attn, "to_add_out")
                for ff in (block.ff, block.ff_context):
                    self._swap_linear(ff.net[0], "proj")
                    self._swap_linear(ff.net, "2")
            for block in self.transformer.single_transformer_blocks:
                attn = block.attn
                fused = self._fuse_single(block)
                attn.to_qkv = torch.nn.Identity()  # the block hands the fused matmul's Q/K/V slice to attention
                self._undo.append(lambda attn=attn: delattr(attn, "to_qkv"))
                self._set_fused(attn)
                block.qkv_mlp = fused
                block.forward = types.MethodType(_fused_single_forward, block)
                self._undo.append(lambda block=block: (delattr(block, "forward"), delattr(block, "qkv_mlp")))
                self._swap_linear(block, "proj_out")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _fuse_single(self, block):
        torch = self.torch
        attn = block.attn
        parts = [attn.to_q, attn.to_k, attn.to_v, block.proj_mlp]
        weight = torch.cat([p.weight.detach() for p in parts])
        bias = torch.cat([p.bias.detach() for p in parts])
        fused = self._fp8(weight, bias)
        del weight, bias
        for part in parts:
            self._offload(part)
        return fused

    def _set_fused(self, attn) -> None:
        previous = getattr(attn, "fused_projections", False)
        attn.fused_projections = True
        self._undo.append(lambda: setattr(attn, "fused_projections", previous))

    def restore(self) -> None:
        if not self.active:
            return
        with self.torch.no_grad():
            while self._undo:
                self._undo.pop()()
        self.quantized = 0
        self.active = False


def _fused_single_forward(
    self, hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None
):
    """FluxSingleTransformerBlock.forward with Q/K/V and MLP-in as one matmul (``self.qkv_mlp``); the attention
    receives the Q/K/V slice through an identity ``to_qkv``."""
    text_length = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = self.norm(hidden_states, emb=temb)
    qkv_width = 3 * self.attn.inner_dim
    fused = self.qkv_mlp(norm_hidden_states)
    qkv, mlp = fused[..., :qkv_width], fused[..., qkv_width:]
    attn_output = self.attn(hidden_states=qkv, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {}))
    hidden_states = torch.cat([attn_output, self.act_mlp(mlp)], dim=2)
    hidden_states = residual + gate.unsqueeze(1) * self.proj_out(hidden_states)
    return hidden_states[:, :text_length], hidden_states[:, text_length:]
