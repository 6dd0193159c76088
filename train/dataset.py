"""Training examples from Diversity-SFT pairs, in the Fill layout, with cached VAE latents.

One ``TrainingPair`` (reference quadruplet, target quadruplet) becomes, through the runtime's own geometry (so training
sees exactly what inference builds):

- ``D_src`` = [reference crop | masked source] and ``D_mask`` = [0 | dilated target mask] -> the Fill condition
  (masked latents 64 + packed mask 256 per token),
- ``D_res`` = [reference crop | abnormal target] -> the clean latents x0 the flow is trained to produce,
- the normal counterpart [reference crop | clean source] -> z_normal of the normal regularization (Eq. 9),
- the reference crop resized to the image encoder's input with Pillow bicubic (as the runtime does),
- the defect-token mask (reference defect + target region: where the key bias puts log alpha), the target tokens
  (right half only: where the velocity MSE weighs more) and the region of Eq. 9: the latent pixels of the
  undilated target mask where D_res differs from its normal counterpart (``normal_region``, see ``unidg.train.flow``).

The VAE is frozen in every stage that reads these examples, so its latents are computed once and kept in a
safetensors cache keyed by a fingerprint of the VAE weights, the pairs and the geometry settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from unidg.core.errors import UniDGError
from unidg.core.geometry import build_text_diptych, defect_token_mask, result_diptych
from unidg.core.layout import DiptychLayout
from unidg.core.settings import UniDGSettings
from unidg.runtime.synthesizer import resize_reference
from unidg.train.model import pack_latents
from unidg.train.pairs import DISTRIBUTIONS, TrainingPair

CACHE_VERSION = 2  # 2: the Eq. 9 region (latent pixels where the defect is)
LATENT_FACTOR = 8  # image pixels per latent pixel, each way


@dataclass(frozen=True)
class PairExample:
    """One training example in pixel space (uint8 images, bool masks)."""

    source: np.ndarray  # (S, 2S, 3) D_src
    mask: np.ndarray  # (S, 2S) D_mask
    result: np.ndarray  # (S, 2S, 3) D_res: the training target
    normal: np.ndarray  # (S, 2S, 3) [reference crop | clean source]: the normal counterpart of D_res
    reference: np.ndarray  # (P, P, 3) reference crop at the image encoder's input size
    defect_tokens: np.ndarray  # (N,) bool: reference defect (left) + target region (right)
    target_tokens: np.ndarray  # (N,) bool: target region only
    distribution: str
    target_pixels: np.ndarray  # (S, 2S) bool: the undilated target mask in the right half


def target_token_mask(defect_tokens: np.ndarray, size: int) -> np.ndarray:
    """Keep only the right-half (target) tokens of a defect-token mask over the (S/16, 2S/16) grid."""
    layout = DiptychLayout(size)
    grid = defect_tokens.reshape(layout.token_hw).copy()
    grid[:, : layout.half_token_columns] = False
    return grid.reshape(-1)


def latent_region(pixels: np.ndarray, factor: int = LATENT_FACTOR) -> np.ndarray:
    """(S, 2S) bool pixels -> (N, 4) bool latent pixels in token order: a latent pixel is set when any pixel of its
    ``factor`` x ``factor`` block is; the 4 latent pixels of a token in its packing order dy * 2 + dx."""
    height, width = pixels.shape
    grid = pixels.reshape(height // factor, factor, width // factor, factor).any(axis=(1, 3))
    h, w = grid.shape
    return grid.reshape(h // 2, 2, w // 2, 2).transpose(0, 2, 1, 3).reshape(-1, 4)


def defect_pixels(example: PairExample) -> np.ndarray:
    """(S, 2S) bool: where the training target D_res differs from its normal counterpart (the defect itself)."""
    return np.any(example.result != example.normal, axis=-1)


def normal_region_pixels(example: PairExample) -> np.ndarray:
    """(S, 2S) bool, the Eq. 9 region in pixels: the undilated target mask where D_res differs from its normal
    counterpart. The mask keeps out differences elsewhere (a re-generated normal image is rarely bit-identical off
    the defect); the difference keeps out the normal pixels of a loose mask."""
    return defect_pixels(example) & example.target_pixels


def build_example(
    pair: TrainingPair,
    settings: UniDGSettings,
    reference_size: int,
    images: dict | None = None,
) -> PairExample:
    """Pixel-space example of a pair at ``settings.resolution`` (``images``: optional per-id cache of loaded arrays)."""
    images = {} if images is None else images

    def load(quadruplet, which: str) -> np.ndarray:
        key = (quadruplet.id, which)
        if key not in images:
            images[key] = getattr(quadruplet, f"load_{which}")()
        return images[key]

    size = settings.resolution
    if getattr(pair, "with_reference", True):
        diptych = settings.diptych(
            load(pair.reference, "abnormal"),
            load(pair.reference, "mask"),
            load(pair.target, "normal"),
            load(pair.target, "mask"),
        )
    else:  # UniDG-Text without a reference (unidg.train.text_sft.TextPair): black left half
        diptych = build_text_diptych(
            load(pair.target, "normal"),
            load(pair.target, "mask"),
            size,
            settings.dilate_kernel,
            settings.dilate_iterations,
        )
    result = result_diptych(diptych, load(pair.target, "abnormal"))
    defect_tokens = defect_token_mask(diptych)
    return PairExample(
        source=diptych.image,
        mask=diptych.mask,
        result=result,
        normal=np.concatenate([result[:, :size], diptych.source_square], axis=1),
        reference=resize_reference(diptych.reference.image, reference_size),
        defect_tokens=defect_tokens,
        target_tokens=target_token_mask(defect_tokens, size),
        distribution=pair.distribution,
        target_pixels=np.concatenate(
            [np.zeros((size, size), bool), diptych.transform.forward_mask(load(pair.target, "mask"))], axis=1
        ),
    )


def to_model_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def pair_key(pair: TrainingPair) -> str:
    if not getattr(pair, "with_reference", True):  # UniDG-Text's no-reference sample of a target
        return f"no-reference:{pair.target.id}"
    return f"{pair.distribution}:{pair.reference.id}->{pair.target.id}"


def _module_digest(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()


class LatentPairs:
    """Cached training tensors of a list of pairs (index i = pair i). All tensors are CPU float32/bool/uint8.

    x0 (M, N, 64) clean latents of D_res; cond (M, N, 320) Fill condition of D_src/D_mask; normal (M, N, 64) latents
    of the normal counterpart and normal_region (M, N, 4) bool, the Eq. 9 region (both absent without normal
    regularization); reference (M, 3, P, P) uint8; defect_tokens / target_tokens (M, N) bool; distribution (M,)
    index into ``pairs.DISTRIBUTIONS``.
    """

    FIELDS = (
        "x0",
        "cond",
        "normal",
        "normal_region",
        "reference",
        "defect_tokens",
        "target_tokens",
        "distribution",
    )
    OPTIONAL = ("normal", "normal_region")

    def __init__(self, tensors: dict[str, torch.Tensor], keys: list[str], resolution: int) -> None:
        missing = [name for name in self.FIELDS if name not in tensors and name not in self.OPTIONAL]
        if missing:
            raise UniDGError(f"latent cache lacks {missing}; delete it and train again to rebuild it")
        self.tensors = tensors
        self.keys = keys
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_normal(self) -> bool:
        return "normal" in self.tensors

    def indices_of(self, distribution: str) -> np.ndarray:
        return np.flatnonzero(self.tensors["distribution"].numpy() == DISTRIBUTIONS.index(distribution))

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        out = {name: tensor.index_select(0, index) for name, tensor in self.tensors.items()}
        out["reference"] = out["reference"].float() / 127.5 - 1.0
        return out

    # ------------------------------------------------------------------ build / cache
    @staticmethod
    def fingerprint(model, pairs: Sequence[TrainingPair], settings: UniDGSettings, with_normal: bool) -> str:
        document = {
            "version": CACHE_VERSION,
            "vae": _module_digest(model.vae),
            "pairs": [pair_key(pair) for pair in pairs],
            "files": sorted({str(p.reference.root) for p in pairs} | {str(p.target.root) for p in pairs}),
            "resolution": settings.resolution,
            "beta": settings.beta,
            "threshold": settings.threshold,
            "dilate": [settings.dilate_kernel, settings.dilate_iterations],
            "reference_size": model.reference_size,
            "normal": with_normal,
        }
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model,
        pairs: Sequence[TrainingPair],
        settings: UniDGSettings,
        with_normal: bool = True,
        batch_size: int = 8,
        progress: bool = False,
    ) -> LatentPairs:
        if not pairs:
            raise UniDGError(
                "no training pairs: the UDG folder yielded none for the selected distributions; check data.train "
                "and train.mix"
            )
        images: dict = {}
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in cls.FIELDS}
        bar = tqdm(total=len(pairs), desc="caching latents", unit="pair", disable=not progress)
        for start in range(0, len(pairs), batch_size):
            examples = [
                build_example(pair, settings, model.reference_size, images)
                for pair in pairs[start : start + batch_size]
            ]
            source = to_model_pixels(np.stack([e.source for e in examples]))
            mask = torch.from_numpy(np.stack([e.mask for e in examples]))
            parts["cond"].append(model.build_condition(source, mask).float().cpu())
            result = to_model_pixels(np.stack([e.result for e in examples]))
            parts["x0"].append(pack_latents(model.encode_images(result)).float().cpu())
            if with_normal:
                normal = to_model_pixels(np.stack([e.normal for e in examples]))
                parts["normal"].append(pack_latents(model.encode_images(normal)).float().cpu())
                region = np.stack([latent_region(normal_region_pixels(e), model.vae_scale_factor) for e in examples])
                parts["normal_region"].append(torch.from_numpy(region))
            parts["reference"].append(torch.from_numpy(np.stack([e.reference for e in examples])).permute(0, 3, 1, 2))
            parts["defect_tokens"].append(torch.from_numpy(np.stack([e.defect_tokens for e in examples])))
            parts["target_tokens"].append(torch.from_numpy(np.stack([e.target_tokens for e in examples])))
            parts["distribution"].append(
                torch.tensor([DISTRIBUTIONS.index(e.distribution) for e in examples], dtype=torch.int64)
            )
            bar.update(len(examples))
            if len(images) > 4096:  # bound memory on large datasets; pairs mostly reuse recent quadruplets
                images.clear()
        bar.close()
        tensors = {name: torch.cat(chunks).contiguous() for name, chunks in parts.items() if chunks}
        return cls(tensors, [pair_key(pair) for pair in pairs], settings.resolution)

    def save(self, path: str | Path, fingerprint: str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {"fingerprint": fingerprint, "keys": json.dumps(self.keys), "resolution": str(self.resolution)}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(self.tensors, str(tmp), metadata=metadata)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, fingerprint: str) -> LatentPairs | None:
        """The cache at ``path`` if it was made for ``fingerprint``; None when absent or stale."""
        path = Path(path)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("fingerprint") != fingerprint:
            return None
        return cls(load_file(str(path)), json.loads(metadata["keys"]), int(metadata["resolution"]))

    @classmethod
    def cached(
        cls,
        model,
        pairs: Sequence[TrainingPair],
        settings: UniDGSettings,
        cache_dir: str | Path | None,
        with_normal: bool = True,
        progress: bool = False,
        write: bool = True,
    ) -> LatentPairs:
        """Load the latent cache for these pairs from ``cache_dir`` or build (and, with ``write``, store) it."""
        fingerprint = cls.fingerprint(model, pairs, settings, with_normal)
        path = None if cache_dir is None else Path(cache_dir) / f"latents-{fingerprint[:16]}.safetensors"
        if path is not None:
            found = cls.load(path, fingerprint)
            if found is not None:
                return found
        data = cls.build(model, pairs, settings, with_normal=with_normal, progress=progress)
        if path is not None and write:
            data.save(path, fingerprint)
        return data
