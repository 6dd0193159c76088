"""``unidg train eq9``: where the normal regularization (paper Eq. 9) can tell the ground truth from "no defect".

Eq. 9 penalises ReLU(mean cos(z0_hat, z_normal) - tau) over a region. A copy of the normal image scores cos = 1, so
its hinge is 1 - tau everywhere; the term is only useful where the ground truth scores clearly lower. For each
candidate region this measures, on real pairs and a model's autoencoder, the hinge at the ground truth (z0_hat = the
latents of D_res) and at a copy of the normal image (z0_hat = z_normal):

- ``dilated-tokens``: the dilated target mask at token granularity (16 x 16 pixels, 64 channels) — the old region;
- ``mask-latent``: the undilated target mask at latent resolution (8 x 8 pixels, 16 channels);
- ``defect-latent``: the latent pixels where D_res differs from its normal counterpart;
- ``mask-and-defect-latent``: both at once — the region training uses (``dataset.normal_region_pixels``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from unidg.core.errors import OptionError
from unidg.core.udg import UDGError, read_index
from unidg.train.dataset import build_example, defect_pixels, latent_region, normal_region_pixels, to_model_pixels
from unidg.train.flow import normal_hinges, region_cosine
from unidg.train.loading import load_model
from unidg.train.model import pack_latents
from unidg.train.pairs import diversity_sft_pairs, mix_pairs

REGIONS = ("dilated-tokens", "mask-latent", "defect-latent", "mask-and-defect-latent")


@torch.no_grad()
def eq9_separation(model, pairs, tau: float = 0.5, batch_size: int = 8) -> dict:
    """Mean hinge at the ground truth and at the normal copy, and the ground truth's mean cosine, per region."""
    if not pairs:
        raise UDGError("no pairs to measure; pass a UDG folder with quadruplets")
    settings = model.settings
    sums = {name: np.zeros(3) for name in REGIONS}
    images: dict = {}
    for start in range(0, len(pairs), batch_size):
        examples = [
            build_example(pair, settings, model.reference_size, images) for pair in pairs[start : start + batch_size]
        ]
        truth = pack_latents(model.encode_images(to_model_pixels(np.stack([e.result for e in examples])))).float()
        normal = pack_latents(model.encode_images(to_model_pixels(np.stack([e.normal for e in examples])))).float()
        factor = model.vae_scale_factor
        regions = {
            "dilated-tokens": torch.from_numpy(np.stack([e.target_tokens for e in examples])),
            "mask-latent": torch.from_numpy(np.stack([latent_region(e.target_pixels, factor) for e in examples])),
            "defect-latent": torch.from_numpy(np.stack([latent_region(defect_pixels(e), factor) for e in examples])),
            "mask-and-defect-latent": torch.from_numpy(
                np.stack([latent_region(normal_region_pixels(e), factor) for e in examples])
            ),
        }
        for name, region in regions.items():
            cosine, _ = region_cosine(truth, normal, region)
            sums[name] += [
                float(normal_hinges(truth, normal, region, tau).sum()),
                float(normal_hinges(normal, normal, region, tau).sum()),
                float(cosine.sum()),
            ]
    count = len(pairs)
    report = {"pairs": count, "tau": tau, "regions": {}}
    for name, (truth_hinge, copy_hinge, cosine) in sums.items():
        report["regions"][name] = {
            "hinge_ground_truth": round(truth_hinge / count, 4),
            "hinge_normal_copy": round(copy_hinge / count, 4),
            "margin": round((copy_hinge - truth_hinge) / count, 4),
            "cosine_ground_truth": round(cosine / count, 4),
        }
    return report


def measure(weights: str | Path, data: str | Path, count: int = 100, seed: int = 0, tau: float = 0.5) -> dict:
    """``count`` pairs of a UDG folder (the three distributions mixed 1:1:1) with a weights folder's autoencoder."""
    model = load_model(weights)
    pairs = mix_pairs(diversity_sft_pairs(list(read_index(data)), seed), seed, allow_missing=True)
    if len(pairs) < count:
        raise OptionError(
            f"--count {count}: {data} yields only {len(pairs)} mixed pairs; lower --count or synthesize more"
        )
    report = eq9_separation(model, pairs[:count], tau)
    report.update(weights=str(weights), data=str(data), resolution=model.settings.resolution)
    return report
