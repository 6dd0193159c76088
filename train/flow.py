"""Flow-matching objective of Diversity-SFT (paper Sec. 5.3, App. C) and of the base inpainter.

Flow convention (the one the samplers integrate): sigma = t in [0, 1], x_t = t * noise + (1 - t) * x0, with x0 the
clean latents of D_res and noise ~ N(0, 1) (the paper's X1 = noise, X0 = data, Eq. 3); the model predicts the
velocity v = noise - x0 (Eq. 4), and a sampler steps x <- x + (sigma_next - sigma) * v from sigma = 1 to 0.
The predicted clean latents are z0_hat = x_t - t * v_hat. t is logit-normal (mu = 0, sigma = 1).

Loss = MSE(v_hat, noise - x0) over all image tokens (target-mask tokens optionally weighted up)
     + w * mean_b ReLU(mean_{i in R_b} cos(z0_hat_i, z_normal_i) - tau)      (Eq. 9, tau = 0.5)

R_b, the region of Eq. 9, is the set of *latent pixels* (8 x 8 image pixels, 16 channels each) of the undilated
target mask where the ground truth differs from its normal counterpart: that is where the defect is. Over the
dilated target mask at token granularity (16 x 16 pixels, 64 channels) most pixels equal the normal image, so the
ground truth itself scored near the hinge of a plain copy of the normal image (measured with ``unidg train eq9``;
see docs/training.md).

The loss of a global batch is assembled from sums over micro-batches (``LossTerms``), so splitting a batch over
processes and accumulation steps computes the same loss and gradients as one batch in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unidg.core.attention_bias import build_key_bias
from unidg.core.settings import UniDGSettings
from unidg.train.config import ConfigError, LossConfig

LATENT_PIXELS_PER_TOKEN = 4  # 2 x 2 latent pixels packed into one token (channel c * 4 + dy * 2 + dx)


def logit_normal_t(generator: torch.Generator, batch: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t ~ logit-normal(mean, std): sigmoid of a normal sample (Esser et al. 2024)."""
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The RNG of one training step: a pure function of (seed, step), so resuming needs no RNG state."""
    sequence = np.random.SeedSequence([int(seed), int(step), 0x5F7])
    return torch.Generator().manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1))


def draw_noise_and_t(
    generator: torch.Generator, shape: tuple[int, ...], loss: LossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (B, N, C) and t (B,) of a whole global batch, on the CPU: every process draws the same values and
    takes its own rows, so the draw does not depend on how the batch is split."""
    noise = torch.randn(shape, generator=generator)
    return noise, logit_normal_t(generator, shape[0], loss.logit_mean, loss.logit_std)


def token_weights(target_tokens: torch.Tensor, mask_weight: float) -> torch.Tensor:
    """(B, N) weight of each token in the velocity MSE: ``mask_weight`` on target-mask tokens, 1 elsewhere."""
    return 1.0 + (mask_weight - 1.0) * target_tokens.float()


def velocity_mse(
    v_pred: torch.Tensor, v_target: torch.Tensor, token_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared velocity error over tokens and channels; ``token_weight`` (B, N) reweights tokens."""
    error = (v_pred.float() - v_target.float()).pow(2).mean(dim=-1)
    if token_weight is None:
        return error.mean()
    return (error * token_weight).sum() / token_weight.sum()


def region_cosine(z0_pred: torch.Tensor, z_normal: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per-sample mean cosine of predicted and normal latents over ``region`` and its size: (B,), (B,).

    ``region`` (B, N) bool compares whole tokens (64 channels); (B, N, 4) compares latent pixels (16 channels), the
    4 pixels of a token in its packing order dy * 2 + dx.
    """
    if region.ndim == 3:
        batch, count, channels = z0_pred.shape
        shape = (batch, count, channels // LATENT_PIXELS_PER_TOKEN, LATENT_PIXELS_PER_TOKEN)
        cosine = F.cosine_similarity(z0_pred.float().reshape(shape), z_normal.float().reshape(shape), dim=2, eps=1e-6)
    else:
        cosine = F.cosine_similarity(z0_pred.float(), z_normal.float(), dim=-1, eps=1e-6)
    weight = region.float().reshape(cosine.shape)
    count = weight.flatten(1).sum(dim=1)
    mean = (cosine * weight).flatten(1).sum(dim=1) / count.clamp(min=1.0)
    return mean, count


def normal_hinges(z0_pred: torch.Tensor, z_normal: torch.Tensor, region: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-sample Eq. 9 terms ReLU(mean cos over the region - tau), (B,); 0 for a sample with an empty region."""
    mean_cos, count = region_cosine(z0_pred, z_normal, region)
    return torch.where(count > 0, F.relu(mean_cos - tau), torch.zeros_like(mean_cos))


def normal_regularization(
    z0_pred: torch.Tensor, z_normal: torch.Tensor, region: torch.Tensor, tau: float = 0.5
) -> torch.Tensor:
    """Paper Eq. 9: mean over the batch of ReLU(s_b - tau), s_b = mean over the region of cos(z0_pred, z_normal)."""
    return normal_hinges(z0_pred, z_normal, region, tau).mean()


@dataclass
class StepInputs:
    """What a loss evaluation needs besides the model; built from a cached batch."""

    x0: torch.Tensor
    cond: torch.Tensor
    reference: torch.Tensor | None  # pixels in [-1, 1] (encoded each step) ...
    key_bias: torch.Tensor | None
    defect_tokens: torch.Tensor
    target_tokens: torch.Tensor
    normal: torch.Tensor | None
    normal_region: torch.Tensor | None = None  # (B, N, 4) latent pixels of Eq. 9 (None: the target tokens)
    reference_tokens: torch.Tensor | None = None  # ... or cached Redux tokens (frozen encoders)
    # UniDG-Text (unidg.train.text_sft): the instruction's T5 states (B, K, D) and CLIP pooled output (B, P), and
    # which rows have a reference (the others' Redux tokens are zeroed, paper B.3). None: reference mode.
    text_states: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    with_reference: torch.Tensor | None = None

    def rows(self, start: int, stop: int) -> StepInputs:
        return StepInputs(**{f.name: _rows(getattr(self, f.name), start, stop) for f in fields(self)})

    def to(self, device: torch.device) -> StepInputs:
        return StepInputs(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    @property
    def eq9_region(self) -> torch.Tensor:
        return self.target_tokens if self.normal_region is None else self.normal_region


def _rows(tensor: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
    return None if tensor is None else tensor[start:stop]


def _to(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, non_blocking=True)


def step_inputs(batch: dict[str, torch.Tensor], model, settings: UniDGSettings, defect_attention: bool) -> StepInputs:
    defect = batch["defect_tokens"].cpu().numpy()
    key_bias = None
    if defect_attention:
        key_bias = build_key_bias(
            defect, model.reference_tokens, settings.text_tokens, settings.alpha, settings.fold_text_tokens
        )
    elif settings.fold_text_tokens:
        # Folding is exact only with log K on the kept zero text key: keep it even without defect attention.
        key_bias = build_key_bias(
            np.zeros_like(defect), model.reference_tokens, settings.text_tokens, 1.0, settings.fold_text_tokens
        )
    return StepInputs(
        x0=batch["x0"],
        cond=batch["cond"],
        reference=batch.get("reference"),
        key_bias=None if key_bias is None else torch.from_numpy(key_bias),
        defect_tokens=batch["defect_tokens"],
        target_tokens=batch["target_tokens"],
        normal=batch.get("normal"),
        normal_region=batch.get("normal_region"),
        reference_tokens=batch.get("reference_tokens"),
        text_states=batch.get("text_states"),
        pooled=batch.get("pooled"),
        with_reference=batch.get("with_reference"),
    )


class LossTerms(NamedTuple):
    """Sums over one micro-batch; the trainer divides them by the global batch's totals."""

    velocity: torch.Tensor  # sum over tokens of token_weight * mean-over-channels squared error
    hinge: torch.Tensor  # sum over samples of the Eq. 9 terms (0 when the term is off)


class FlowObjective(nn.Module):
    """The loss terms of a micro-batch as a module, so DistributedDataParallel can wrap it (its forward is what
    DDP synchronises). Holds the model; noise and t come from the caller."""

    def __init__(self, model, loss: LossConfig, guidance: float, img_ids: torch.Tensor, precision: str) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.guidance = guidance
        self.register_buffer("img_ids", img_ids, persistent=False)
        self.precision = precision

    def forward(self, inputs: StepInputs, noise: torch.Tensor, t: torch.Tensor) -> LossTerms:
        model, loss = self.model, self.loss
        device = inputs.x0.device
        t_tokens = t[:, None, None]
        x_t = t_tokens * noise + (1.0 - t_tokens) * inputs.x0
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            reference = inputs.reference_tokens
            if reference is None:
                reference = model.encode_reference(inputs.reference)
            if inputs.with_reference is not None:
                reference = reference * inputs.with_reference.to(reference.dtype)[:, None, None]
            ctx, txt_ids = model.context(reference, text_states=inputs.text_states)
            v_pred = model.velocity(
                x_t, inputs.cond, ctx, inputs.key_bias, t, self.guidance, self.img_ids, txt_ids, pooled=inputs.pooled
            )
        v_pred = v_pred.float()
        error = (v_pred - (noise - inputs.x0)).pow(2).mean(dim=-1)
        velocity = (error * token_weights(inputs.target_tokens, loss.mask_weight)).sum()
        hinge = velocity.new_zeros(())
        if loss.normal_reg_weight > 0:
            if inputs.normal is None:
                raise ConfigError(
                    "loss.normal_reg_weight > 0 needs the normal-counterpart latents; rebuild the latent cache "
                    "with them, or set loss.normal_reg_weight = 0"
                )
            z0_pred = x_t - t_tokens * v_pred
            hinge = normal_hinges(z0_pred, inputs.normal, inputs.eq9_region, loss.normal_reg_tau).sum()
        return LossTerms(velocity, hinge)


def combine_terms(
    velocity_sum: torch.Tensor, hinge_sum: torch.Tensor, weight_total: float, batch: int, loss: LossConfig
) -> torch.Tensor:
    """The global loss (or one process's share of it) from summed terms and the global batch's totals."""
    return velocity_sum / weight_total + loss.normal_reg_weight * hinge_sum / batch


def flow_matching_loss(
    model,
    inputs: StepInputs,
    generator: torch.Generator,
    loss: LossConfig,
    guidance: float,
    img_ids: torch.Tensor,
    precision: str = "fp32",
) -> tuple[torch.Tensor, dict[str, float]]:
    """One Diversity-SFT loss evaluation of a whole batch in this process (noise and t drawn from ``generator``)."""
    noise, t = draw_noise_and_t(generator, tuple(inputs.x0.shape), loss)
    terms = FlowObjective(model, loss, guidance, img_ids, precision)(inputs, noise, t)
    batch = inputs.x0.shape[0]
    weight_total = float(token_weights(inputs.target_tokens, loss.mask_weight).sum())
    total = combine_terms(terms.velocity, terms.hinge, weight_total, batch, loss)
    parts = {"velocity": float(terms.velocity.detach()) / weight_total}
    if loss.normal_reg_weight > 0:
        parts["normal_reg"] = float(terms.hinge.detach()) / batch
    parts["loss"] = float(total.detach())
    parts["t_mean"] = float(t.mean())
    return total, parts
