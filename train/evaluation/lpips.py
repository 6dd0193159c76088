"""LPIPS (Zhang et al. 2018, AlexNet variant, version 0.1) from a local safetensors checkpoint, for ``unidg eval
diversity --lpips PATH``. Nothing is downloaded: without a checkpoint the diversity figures use the documented
1 - SSIM substitute (``generation_metrics``).

The network: inputs in [-1, 1] shifted and scaled per channel, torchvision's AlexNet ``features`` stack (convs at
indices 0, 3, 6, 8, 10, each followed by a ReLU whose output is one LPIPS layer; max-pools at 2 and 5), each layer's
activations normalised to unit length over channels, their squared difference weighted per channel by a non-negative
1x1 convolution (``lin{k}``), averaged over space and summed over the five layers.

Checkpoint layout (one ``.safetensors`` file): torchvision's ``features.{i}.weight`` / ``features.{i}.bias`` for
i = 0, 3, 6, 8, 10 and the lpips package's ``lin{k}.model.1.weight`` ([1, C_k, 1, 1]) for k = 0..4. To make one from
the published weights on a machine that has them: load the lpips package's ``weights/v0.1/alex.pth`` and
torchvision's ``alexnet`` state dict (both with ``torch.load(..., weights_only=True)``), keep the keys above, and
write them with ``safetensors.torch.save_file``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unidg.core.errors import UniDGError

CONV_LAYERS = {0: (64, 3, 11, 4, 2), 3: (192, 64, 5, 1, 2), 6: (384, 192, 3, 1, 1), 8: (256, 384, 3, 1, 1)}
CONV_LAYERS[10] = (256, 256, 3, 1, 1)  # index: (out, in, kernel, stride, padding), torchvision's AlexNet
POOL_AFTER = (0, 3)  # max-pool 3x3 stride 2 after these convs' ReLU (features.2 and features.5)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# The smallest side for which the last conv still sees a 1x1 map: 11x11/4 conv and two 3x3/2 pools.
MIN_SIDE = 31


def expected_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for index, (out, inp, kernel, _, _) in CONV_LAYERS.items():
        shapes[f"features.{index}.weight"] = (out, inp, kernel, kernel)
        shapes[f"features.{index}.bias"] = (out,)
    for k, (out, *_rest) in enumerate(CONV_LAYERS.values()):
        shapes[f"lin{k}.model.1.weight"] = (1, out, 1, 1)
    return shapes


class LpipsAlex(nn.Module):
    """LPIPS distance between two image batches in [-1, 1] ([N, 3, H, W] each) -> [N]."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.state = {name: tensor.float() for name, tensor in state.items()}
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        taps = []
        for index, (_, _, _, stride, padding) in CONV_LAYERS.items():
            weight, bias = self.state[f"features.{index}.weight"], self.state[f"features.{index}.bias"]
            x = F.relu(F.conv2d(x, weight, bias, stride=stride, padding=padding))
            taps.append(x)
            if index in POOL_AFTER:
                x = F.max_pool2d(x, kernel_size=3, stride=2)
        return taps

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(a.shape[0])
        for k, (fa, fb) in enumerate(zip(self.layers(a), self.layers(b))):
            fa = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            fb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            weighted = F.conv2d((fa - fb) ** 2, self.state[f"lin{k}.model.1.weight"])
            total = total + weighted.mean(dim=(1, 2, 3))
        return total


def load_lpips(path: str | Path) -> LpipsAlex:
    """The LPIPS network of a local checkpoint; refuses a file of another layout, naming the keys."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise UniDGError(f"--lpips {path}: expected a local .safetensors LPIPS checkpoint (layout in docs/eval.md)")
    state = load_file(str(path))
    want = expected_shapes()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(name for name in set(want) & set(state) if tuple(state[name].shape) != want[name])
    if missing or unexpected or wrong:
        details = [
            f"{label} {names[:3]}" for label, names in (("missing", missing), ("unexpected", unexpected)) if names
        ]
        details += [f"{name} is {list(state[name].shape)}, expected {list(want[name])}" for name in wrong[:3]]
        raise UniDGError(
            f"--lpips {path} is not an LPIPS AlexNet checkpoint: {'; '.join(details)}. Write torchvision's "
            "features.* and lpips' lin*.model.1.weight tensors (docs/eval.md)"
        )
    return LpipsAlex(state).eval()


def lpips_distance(network: LpipsAlex, a: np.ndarray, b: np.ndarray) -> float:
    """LPIPS between two uint8 HxWx3 images. Crops smaller than ``MIN_SIDE`` (IL-a boxes can be) are resized up
    bilinearly to it first: AlexNet's last layer would otherwise see no pixels."""

    def tensor(image: np.ndarray) -> torch.Tensor:
        x = (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0).contiguous()
        h, w = x.shape[2:]
        if min(h, w) < MIN_SIDE:
            factor = MIN_SIDE / min(h, w)
            size = (max(MIN_SIDE, round(h * factor)), max(MIN_SIDE, round(w * factor)))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    with torch.no_grad():
        return float(network(tensor(a), tensor(b))[0])
