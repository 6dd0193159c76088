"""``unidg train base``: a base UniDG model trained from scratch (the stand-in for FLUX.1-Fill + Redux + the FLUX
VAE, which cannot be downloaded here).

Stage 1, autoencoder: the preset's AutoencoderKL learns to reconstruct random crops of the diptychs it will see
(reference crops on white, masked sources, abnormal targets; optionally centred on defects), L1 + MSE + colour terms
+ a small KL, optionally from a colour-path start (``start_with_color_path``: GroupNorm otherwise erases each
image's colour from a small autoencoder) and with a latent-moment term. Its latents are then made
zero-mean, unit-std per channel *after* the fixed FLUX normalization ``(z - 0.1159) * 0.3611`` (which the runtime
hard-codes): the affine is folded exactly into the encoder's output convolution and into the decoder's input
convolution, and the decoder is fine-tuned briefly to absorb the border effect of that fold (zero padding).

Stage 2, Fill-style diptych inpainter: with the autoencoder frozen and its latents cached, the transformer, SigLIP and
Redux learn jointly, by flow matching, to fill the right half's mask given the reference crop on the left (the
defect-fill distribution: reference = target's own defect), with defect attention on; the same loop as
Diversity-SFT (``unidg.train.trainer.FlowTrainer``) with all weights trainable.

The result is a weights folder (``unidg.train.loading`` layout: safetensors + configs + unidg.json + manifest.json).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from unidg.core.manifest import atomic_write_text
from unidg.core.settings import UniDGSettings
from unidg.train.checkpoints import append_record, read_log
from unidg.train.config import BaseConfig, LossConfig, OptimConfig, settings_of, to_dict
from unidg.train.dataset import LatentPairs, build_example, to_model_pixels
from unidg.train.flow import step_generator
from unidg.train.loading import save_model
from unidg.train.model import UniDGModel
from unidg.train.pairs import pools_of, prepare_pairs, select_pairs
from unidg.train.trainer import (
    Placement,
    barrier,
    distributed,
    recipe_trainer,
    sample_schedule,
)

VAE_STAGE = "vae"
VAE_FILE = "vae.safetensors"
INPAINTER_STAGE = "inpainter"
MODEL_FOLDER = "model"


# ============================================================================ stage 1: autoencoder
@dataclass
class VaePool:
    """What the autoencoder trains on: images (M, S, 2S, 3) uint8 (D_src, D_res and the normal counterpart of each
    pair) and, per image, its defect pixels (M, S, 2S) bool: where D_res differs from its normal counterpart."""

    images: np.ndarray
    defects: np.ndarray

    def __len__(self) -> int:
        return len(self.images)


def vae_image_pool(pairs, settings: UniDGSettings, reference_size: int) -> VaePool:
    """D_src, D_res and the normal counterpart of each pair (what the autoencoder will encode), with defect pixels."""
    images: dict = {}
    pool, defects = [], []
    for pair in pairs:
        example = build_example(pair, settings, reference_size, images)
        defect = np.any(example.result != example.normal, axis=-1)
        pool.extend([example.source, example.result, example.normal])
        defects.extend([defect] * 3)
    return VaePool(np.stack(pool), np.stack(defects))


def random_crops(
    pool: VaePool, generator: torch.Generator, batch: int, crop: int, defect_fraction: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random crops (with random horizontal flips) of the pool, float NCHW in [-1, 1], and their defect
    pixels (N, 1, crop, crop) bool. A ``defect_fraction`` of them is centred on a random defect pixel (clamped to the
    image): defects are a few per cent of the pixels, yet they are what the model is for."""
    count, height, width, _ = pool.images.shape
    picks = torch.randint(count, (batch,), generator=generator).tolist()
    ys = torch.randint(height - crop + 1, (batch,), generator=generator).tolist()
    xs = torch.randint(width - crop + 1, (batch,), generator=generator).tolist()
    flips = torch.rand(batch, generator=generator).lt(0.5).tolist()
    centred = torch.rand(batch, generator=generator).lt(defect_fraction).tolist()
    choices = torch.rand(batch, generator=generator).tolist()
    crops, defects = [], []
    for i, y, x, flip, centre, choice in zip(picks, ys, xs, flips, centred, choices):
        defect_y, defect_x = np.nonzero(pool.defects[i]) if centre else ((), ())
        if len(defect_y):
            k = int(choice * len(defect_y))
            y = int(np.clip(defect_y[k] - crop // 2, 0, height - crop))
            x = int(np.clip(defect_x[k] - crop // 2, 0, width - crop))
        patch = pool.images[i, y : y + crop, x : x + crop]
        defect = pool.defects[i, y : y + crop, x : x + crop]
        crops.append(patch[:, ::-1] if flip else patch)
        defects.append(defect[:, ::-1] if flip else defect)
    return to_model_pixels(np.stack(crops)), torch.from_numpy(np.stack(defects)[:, None].copy())


def latent_moments(latents: torch.Tensor, shift: float, scale: float) -> torch.Tensor:
    """Mean over channels of mean^2 + log(std)^2 of the normalized latents ``(z - shift) * scale`` (0 when every
    channel is zero-mean, unit-std over the batch)."""
    normalized = ((latents - shift) * scale).transpose(0, 1).flatten(1)
    return (normalized.mean(dim=1).pow(2) + normalized.std(dim=1).clamp(min=1e-4).log().pow(2)).mean()


def vae_loss(
    vae,
    pixels: torch.Tensor,
    kl_weight: float,
    color_weight: float = 0.0,
    sample: bool = True,
    moment_weight: float = 0.0,
    defects: torch.Tensor | None = None,
    defect_weight: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """L1 + MSE + color_weight * L1 of 4x4-average-pooled colours + kl_weight * KL (per latent element)
    + moment_weight * ``latent_moments`` of the posterior means + defect_weight * L1 over the ``defects`` pixels
    (N, 1, H, W) bool."""
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.sample() if sample else posterior.mode()
    reconstruction = vae.decode(latents).sample
    l1 = (reconstruction - pixels).abs().mean()
    mse = (reconstruction - pixels).pow(2).mean()
    # A small autoencoder learns luminance long before chroma; the low-pass term makes colour fidelity come first.
    color = (F.avg_pool2d(reconstruction, 4) - F.avg_pool2d(pixels, 4)).abs().mean()
    # The crop's mean colour: GroupNorm normalizes it away inside the networks, so it is learned last unless asked.
    color = color + (reconstruction.mean(dim=(2, 3)) - pixels.mean(dim=(2, 3))).abs().mean()
    kl = posterior.kl().mean() / latents[0].numel()
    # The runtime's fixed FLUX normalization must give unit latents; learning that keeps the final fold (whose
    # zero padding the decoder has to re-learn) close to the identity.
    moments = latent_moments(posterior.mode(), vae.config.shift_factor, vae.config.scaling_factor)
    total = l1 + mse + color_weight * color + kl_weight * kl + moment_weight * moments
    defect = torch.zeros(())
    if defects is not None and defect_weight > 0 and bool(defects.any()):
        # Thin defects are a sliver of each crop: the plain L1 lets them blur into the background at no cost.
        weight = defects.to(pixels.dtype)
        defect = ((reconstruction - pixels).abs() * weight).sum() / (weight.sum() * pixels.shape[1])
        total = total + defect_weight * defect
    parts = {
        "loss": float(total.detach()),
        "l1": float(l1.detach()),
        "mse": float(mse.detach()),
        "color": float(color.detach()),
        "kl": float(kl.detach()),
        "moments": float(moments.detach()),
        "defect": float(defect.detach()),
    }
    return total, parts


COLOR_CHANNELS = 3
CARRIER = 3  # the channel that holds a large constant next to the three colour channels
CARRIER_VALUE = 30.0
SILU_OFFSET = 3.0  # colour values sit around +3 before each SiLU, where it is nearly linear


def _pass_through(conv: torch.nn.Conv2d, channels: int, taps: list[tuple[int, int]], weight: float) -> None:
    """Output channels 0..channels-1 of ``conv`` read only their own input channel, at ``taps`` with ``weight``."""
    conv.weight[:channels].zero_()
    for c in range(channels):
        for y, x in taps:
            conv.weight[c, c, y, x] = weight
    if conv.bias is not None:
        conv.bias[:channels].zero_()


def _silence_branch(block, channels: int) -> None:
    """A residual block adds nothing to channels 0..channels-1 (its skip path passes them on unchanged)."""
    if hasattr(block, "conv2"):  # ResnetBlock2D
        block.conv2.weight[:channels].zero_()
        block.conv2.bias[:channels].zero_()
        if block.conv_shortcut is not None:
            _pass_through(block.conv_shortcut, channels, [(0, 0)], 1.0)
    else:  # Attention: out = to_out(attention) + residual
        block.to_out[0].weight[:channels].zero_()
        block.to_out[0].bias[:channels].zero_()


def _linear_group_norm(norm: torch.nn.GroupNorm) -> None:
    """Undo ``norm``'s normalization for the colour channels, given the carrier dominates their group, and shift
    them to +SILU_OFFSET for the SiLU that follows."""
    group = norm.num_channels // norm.num_groups
    mean = CARRIER_VALUE / group
    std = CARRIER_VALUE * math.sqrt(group - 1) / group
    norm.weight[:COLOR_CHANNELS] = std
    norm.bias[:COLOR_CHANNELS] = mean + SILU_OFFSET


@torch.no_grad()
def start_with_color_path(vae) -> None:
    """Initialise the autoencoder with a colour path: latents 0-2 start as the 8x8-average RGB of the image and the
    decoder starts by painting them back (nearest-upsampled), so colour is right from step 1 and training adds
    the detail.

    Why: every GroupNorm in the FLUX autoencoder normalizes each image's features per group, which removes an
    image's absolute colour; a small autoencoder trained from scratch then learns luminance and paints every image
    in the data's average tint. The path keeps colour in channels 0-2 of the residual stream, next to a large
    constant carrier channel that dominates their GroupNorm group, so those norms act linearly on them.
    """
    groups = vae.encoder.conv_norm_out.num_groups
    for norm in (vae.encoder.conv_norm_out, vae.decoder.conv_norm_out):
        if norm.num_channels // groups < 4:
            raise ValueError(
                f"the colour path needs >= 4 channels per GroupNorm group (got {norm.num_channels} / {groups})"
            )
    stream = COLOR_CHANNELS + 1
    centre = [(1, 1)]
    encoder, decoder = vae.encoder, vae.decoder
    # Encoder: RGB in, 2x2 averages at each downsampling, read out as latent means 0-2.
    _pass_through(encoder.conv_in, COLOR_CHANNELS, centre, 1.0)
    encoder.conv_in.weight[CARRIER].zero_()
    encoder.conv_in.bias[CARRIER] = CARRIER_VALUE
    for block in encoder.down_blocks:
        for resnet in block.resnets:
            _silence_branch(resnet, stream)
        for downsampler in block.downsamplers or []:
            _pass_through(downsampler.conv, stream, [(0, 0), (0, 1), (1, 0), (1, 1)], 0.25)
    for module in list(encoder.mid_block.resnets) + list(encoder.mid_block.attentions):
        _silence_branch(module, stream)
    _linear_group_norm(encoder.conv_norm_out)
    silu_offset = SILU_OFFSET * torch.sigmoid(torch.tensor(SILU_OFFSET)).item()
    conv_out = vae.quant_conv if vae.quant_conv is not None else encoder.conv_out
    _pass_through(conv_out, COLOR_CHANNELS, centre, 1.0)
    conv_out.bias[:COLOR_CHANNELS] = -silu_offset
    # Decoder: latents 0-2 copied into the stream, nearest-upsampled, painted as RGB.
    _pass_through(decoder.conv_in, COLOR_CHANNELS, centre, 1.0)
    decoder.conv_in.weight[CARRIER].zero_()
    decoder.conv_in.bias[CARRIER] = CARRIER_VALUE
    for module in list(decoder.mid_block.resnets) + list(decoder.mid_block.attentions):
        _silence_branch(module, stream)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            _silence_branch(resnet, stream)
        for upsampler in block.upsamplers or []:
            _pass_through(upsampler.conv, stream, centre, 1.0)
    _linear_group_norm(decoder.conv_norm_out)
    _pass_through(decoder.conv_out, COLOR_CHANNELS, centre, 1.0)
    decoder.conv_out.bias[:COLOR_CHANNELS] = -silu_offset


@torch.no_grad()
def start_posterior_narrow(vae, log_variance: float) -> None:
    """Start every latent's posterior log-variance at ``log_variance`` (the encoder's output bias).

    From the default 0 the sampled latents carry unit noise, which buries every signal weaker than luminance: the
    autoencoder then learns a sepia image long before any chroma. A narrow start lets colour through from step 1;
    the KL term still widens the posterior where it can.
    """
    conv_out = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    channels = vae.config.latent_channels
    conv_out.weight[channels:].mul_(0.1)
    conv_out.bias[channels:].fill_(log_variance)


@torch.no_grad()
def normalize_vae(vae, pool: np.ndarray, batches: int, generator: torch.Generator) -> dict:
    """Fold a per-channel affine into the VAE so that (z - shift) * scale is zero-mean, unit-std per channel.

    Encoder side exact (output conv: mean channels scaled and shifted, log-variance shifted by 2 log a); decoder
    side exact up to the zero padding of its 3x3 input conv (fine-tuned afterwards).
    """
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    channels = vae.config.latent_channels
    samples = []
    for start in range(0, min(len(pool), batches * 8), 8):
        pixels = to_model_pixels(pool[start : start + 8]).to(vae.device)
        samples.append(vae.encode(pixels).latent_dist.mode().cpu())
    latents = torch.cat(samples).transpose(0, 1).reshape(channels, -1).double()
    mean, std = latents.mean(dim=1), latents.std(dim=1).clamp(min=1e-6)
    # Want z' = a z + b with (z' - shift) * scale = (z - mean) / std.
    a = 1.0 / (std * scale)
    b = shift - mean * a
    conv_out = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    weight, bias = conv_out.weight.double(), conv_out.bias.double()
    weight[:channels] *= a[:, None, None, None]
    bias[:channels] = a * bias[:channels] + b
    bias[channels:] += 2.0 * torch.log(a)
    conv_out.weight.copy_(weight.float())
    conv_out.bias.copy_(bias.float())
    conv_in = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder.conv_in
    w_in = conv_in.weight.double()  # (C_out, latent, k, k); z = (z' - b) / a
    conv_in.bias.copy_((conv_in.bias.double() - (w_in * (b / a)[None, :, None, None]).sum(dim=(1, 2, 3))).float())
    conv_in.weight.copy_((w_in / a[None, :, None, None]).float())
    return {"raw_mean": mean.tolist(), "raw_std": std.tolist()}


def train_vae(
    model, pool: VaePool, config: BaseConfig, run_dir: Path, progress: bool, device: torch.device | None = None
) -> dict:
    """Stage 1 on ``device``; returns a summary (losses, seconds). Writes run_dir/vae/{vae.safetensors, log.jsonl}
    (from every process: each trains the same autoencoder from the same seed, so they write the same bytes)."""
    stage = config.vae
    vae = model.vae.to(device or torch.device("cpu"))
    if stage.color_path:
        start_with_color_path(vae)
    if stage.initial_log_variance is not None:
        start_posterior_narrow(vae, stage.initial_log_variance)
    vae.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=stage.lr, weight_decay=0.0)
    folder = run_dir / VAE_STAGE
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "log.jsonl"
    started = time.time()
    finetune_steps = stage.decoder_finetune_steps if stage.decoder_finetune_steps >= 0 else max(stage.steps // 8, 1)
    finetune_steps = finetune_steps if stage.steps else 0
    total_steps = stage.steps + finetune_steps
    records = []
    with open(log_path, "w") as log, tqdm(total=total_steps, desc="vae", unit="step", disable=not progress) as bar:
        for step in range(1, total_steps + 1):
            if step == stage.steps + 1:
                vae.eval()
                stats = normalize_vae(
                    vae, pool.images, stage.scale_fit_batches, step_generator(config.seed, 20_000_000)
                )
                # Decoder-only fine-tune: the encoder (and so every cached latent) is final from here on.
                vae.encoder.requires_grad_(False)
                optimizer = torch.optim.AdamW(
                    [p for p in vae.parameters() if p.requires_grad], lr=stage.lr * 0.1, weight_decay=0.0
                )
                vae.train()
            generator = step_generator(config.seed, 10_000_000 + step)
            pixels, defects = random_crops(pool, generator, stage.batch_size, stage.crop, stage.defect_crop_fraction)
            pixels, defects = pixels.to(vae.device), defects.to(vae.device)
            lr = stage.lr * min(1.0, step / 50) * (0.5 * (1 + math.cos(math.pi * min(step / max(stage.steps, 1), 1))))
            for group in optimizer.param_groups:
                group["lr"] = max(lr, stage.lr * 0.05) if step <= stage.steps else stage.lr * 0.1
            with torch.random.fork_rng():
                torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
                total, parts = vae_loss(
                    vae,
                    pixels,
                    stage.kl_weight,
                    stage.color_weight,
                    sample=step <= stage.steps,
                    moment_weight=stage.moment_weight if step <= stage.steps else 0.0,
                    defects=defects,
                    defect_weight=stage.defect_weight,
                )
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            record = {"step": step, **parts, "phase": "autoencoder" if step <= stage.steps else "decoder"}
            append_record(log, records, record)
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
            bar.update(1)
    if finetune_steps == 0:
        stats = normalize_vae(vae, pool.images, stage.scale_fit_batches, step_generator(config.seed, 20_000_000))
    vae.eval().requires_grad_(False)
    save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, str(folder / VAE_FILE))
    summary = {
        "seconds": round(time.time() - started, 1),
        "steps": stage.steps,
        "decoder_finetune_steps": finetune_steps,
        "first_loss": _mean([r["loss"] for r in records[:20]]),
        "last_loss": _mean([r["loss"] for r in records[-20:]]),
        "normalization": stats,
    }
    atomic_write_text(folder / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


# ============================================================================ stage 2: inpainter
def train_inpainter(
    model,
    data: LatentPairs,
    config: BaseConfig,
    settings: UniDGSettings,
    run_dir: Path,
    resume: bool,
    placement: Placement | None = None,
):
    stage = config.inpainter
    model.vae.requires_grad_(False)
    for module in (model.transformer, model.image_encoder, model.redux):
        module.requires_grad_(True)
    if config.train.gradient_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    trainable = {}
    for prefix in ("transformer", "image_encoder", "redux"):
        for name, parameter in getattr(model, prefix).named_parameters():
            trainable[f"{prefix}.{name}"] = parameter
    optim = OptimConfig(
        name="adamw",
        lr=stage.lr,
        weight_decay=stage.weight_decay,
        warmup_steps=stage.warmup_steps,
        grad_clip=stage.grad_clip,
    )
    schedule = sample_schedule(pools_of(data), stage.mix, stage.steps, stage.batch_size, config.seed)
    loss = LossConfig(
        logit_mean=config.loss.logit_mean,
        logit_std=config.loss.logit_std,
        normal_reg_weight=0.0,  # a Fill model knows nothing of defects vs normals; Eq. 9 belongs to SFT
        mask_weight=config.loss.mask_weight,
    )
    # Without the step count, so a finished run can be extended (as in ``unidg.train.sft.setup_sft``).
    inpainter = {k: v for k, v in to_dict(stage).items() if k != "steps"}
    fingerprint = {"data": data.keys[:3] + [len(data.keys)], "inpainter": inpainter, "seed": config.seed}
    trainer = recipe_trainer(
        model,
        data,
        trainable,
        optim,
        schedule,
        loss,
        settings,
        config.train,
        config.seed,
        run_dir / INPAINTER_STAGE,
        fingerprint=fingerprint,
        description="inpainter",
        placement=placement,
    )
    started = time.time()
    records = trainer.run(resume=resume)
    model.requires_grad_(False)
    return trainer, records, time.time() - started


# ============================================================================ unidg train base
def train_base(config: BaseConfig, resume: bool = True, model=None) -> Path:
    """Both stages; returns the weights folder OUTPUT/model. Re-running resumes: a finished autoencoder stage is
    reloaded, the inpainter continues from its latest checkpoint. Under ``torchrun`` the inpainter is trained data
    parallel and rank 0 writes the weights folder."""
    with distributed(config.train.device) as placement:
        return _train_base(config, resume, model, placement)


def _train_base(config: BaseConfig, resume: bool, model, placement: Placement) -> Path:
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    settings = settings_of(config)
    run_dir = Path(config.output)
    if placement.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(to_dict(config), indent=2) + "\n")
    if model is None:
        model = UniDGModel.from_preset(config.preset, seed=config.seed, settings=settings)
    model.settings = settings
    progress = config.train.progress

    pairs = prepare_pairs(config.data.train, config.seed, config.data.limit)
    vae_file = run_dir / VAE_STAGE / VAE_FILE
    trained_here = placement.is_main and not (resume and vae_file.is_file())
    if trained_here:  # rank 0 trains the autoencoder; the other processes wait for its file
        fill_pairs = [pair for pair in pairs if pair.distribution == "defect-fill"]
        pool = vae_image_pool(fill_pairs or pairs, settings, model.reference_size)
        vae_summary = train_vae(model, pool, config, run_dir, progress, placement.device)
    barrier(placement)
    if not trained_here:
        model.vae.load_state_dict(load_file(str(vae_file)))
        vae_summary = json.loads((run_dir / VAE_STAGE / "summary.json").read_text())
    model.vae.to(placement.device).eval().requires_grad_(False)

    inpainter_pairs = select_pairs(pairs, config.inpainter.mix)
    cache_dir = run_dir / "cache" if config.data.cache else None
    data = LatentPairs.cached(
        model,
        inpainter_pairs,
        settings,
        cache_dir,
        with_normal=False,
        progress=progress and placement.is_main,
        write=placement.is_main,
    )
    trainer, _, seconds = train_inpainter(model, data, config, settings, run_dir, resume, placement)
    if not placement.is_main:
        return run_dir / MODEL_FOLDER
    log = read_log(run_dir / INPAINTER_STAGE)
    summary = {
        "vae": vae_summary,
        "inpainter": {
            "steps": trainer.step,
            "pairs": len(data),
            "seconds_this_call": round(seconds, 1),
            "first_loss": _mean([r["loss"] for r in log[:20]]),
            "last_loss": _mean([r["loss"] for r in log[-20:]]),
        },
    }
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    folder = save_model(
        model.to("cpu"),
        run_dir / MODEL_FOLDER,
        metadata={"stage": "base", "preset": config.preset, "training": summary, "config": to_dict(config)},
        overwrite=True,
    )
    return folder


def reconstruction_error(model, pool: np.ndarray, count: int = 8) -> float:
    """Mean absolute error (in [-1, 1] units) of encode -> decode on ``count`` full diptychs."""
    with torch.no_grad():
        pixels = to_model_pixels(pool[:count])
        decoded = model.decode_latents(model.encode_images(pixels))
    return float(F.l1_loss(decoded.clamp(-1, 1), pixels))
