"""The RFT policy's velocity: the reference policy (the same model with its adapters switched off), the per-rollout
conditioning rows and the velocity with per-row CFG against a negative reference (``unidg.train.rft``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """The reference policy: every peft adapter layer of ``module`` switched off (what PeftModel.disable_adapter
    does), restored on exit."""
    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the model has no adapter layers to disable")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


@dataclass
class PromptBatch:
    """Per-rollout conditioning rows (B rollouts) and the variety each was drawn with."""

    cond: torch.Tensor  # (B, N, 320)
    ctx: torch.Tensor  # (B, C, D)
    negative_ctx: torch.Tensor  # (B, C, D) the CFG's negative reference
    key_bias: torch.Tensor  # (B, C + N)
    cfg: torch.Tensor  # (B,)

    def rows(self, index: torch.Tensor | slice) -> PromptBatch:
        return PromptBatch(
            self.cond[index], self.ctx[index], self.negative_ctx[index], self.key_bias[index], self.cfg[index]
        )


def guided_velocity(model, x, sigma, prompts: PromptBatch, guidance: float, img_ids, txt_ids, precision: str):
    """v(x, sigma) with per-row CFG against the negative reference: v_neg + s (v - v_neg) where s != 1."""
    device = x.device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        v = model.velocity(x, prompts.cond, prompts.ctx, prompts.key_bias, sigma, guidance, img_ids, txt_ids).float()
        guided = prompts.cfg != 1.0
        if bool(guided.any()):
            rows = torch.nonzero(guided).flatten()
            v_neg = model.velocity(
                x[rows],
                prompts.cond[rows],
                prompts.negative_ctx[rows],
                prompts.key_bias[rows],
                sigma[rows],
                guidance,
                img_ids,
                txt_ids,
            ).float()
            scale = prompts.cfg[rows].reshape(-1, 1, 1)
            v = v.clone()
            v[rows] = v_neg + scale * (v[rows] - v_neg)
    return v
