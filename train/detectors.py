"""Downstream inspection models of the paper's protocol (Sec. 6.2): a U-Net for binary and multi-class defect
segmentation, a ResNet-34 defect-type classifier, and a multi-task U-Net (defect map + defect type, UniADC's
discriminator on this backbone).

Plain ``torch.nn``: torchvision is not a dependency (PyPI's torchvision wheels fail to import beside the pinned torch
2.13.0 CPU build). ``ResNet34`` keeps torchvision's module names and shapes (``conv1``, ``bn1``, ``layer1``..``layer4``
of [3, 4, 6, 3] BasicBlocks with ``downsample.0``/``downsample.1``, ``fc``), so a torchvision ``resnet34``
state_dict loads into it with ``load_state_dict(strict=True)`` where one is at hand; ``width`` < 64 shrinks every stage
for quick runs (then no torchvision weights fit).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet34(nn.Module):
    """ResNet-34 (He et al. 2016) in torchvision's layout; ``num_classes`` outputs."""

    layers = (3, 4, 6, 3)

    def __init__(self, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for index, blocks in enumerate(self.layers):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stage = [BasicBlock(inplanes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015): ``depth`` down/up stages from ``width`` channels, ``num_classes`` logits per
    pixel (1 for binary defect segmentation, 1 + defect types for multi-class). Input sides: multiples of 2**depth."""

    def __init__(self, num_classes: int = 1, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        channels = [width * 2**i for i in range(depth + 1)]
        self.inc = _double_conv(3, channels[0])
        self.down = nn.ModuleList(_double_conv(channels[i], channels[i + 1]) for i in range(depth))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.up_conv = nn.ModuleList(_double_conv(2 * channels[i], channels[i]) for i in reversed(range(depth)))
        self.outc = nn.Conv2d(channels[0], num_classes, 1)
        self.depth = depth

    def decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(full-resolution features before ``outc``, the bottleneck features)."""
        if x.shape[-1] % 2**self.depth or x.shape[-2] % 2**self.depth:
            raise ValueError(f"UNet input sides must be multiples of {2**self.depth} (got {tuple(x.shape[-2:])})")
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        x = bottleneck = skips.pop()
        for up, conv in zip(self.up, self.up_conv):
            x = conv(torch.cat([skips.pop(), up(x)], dim=1))
        return x, bottleneck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outc(self.decode(x)[0])


class MultiTaskUNet(UNet):
    """UniADC's multi-task discriminator on a U-Net backbone: the binary defect map (``forward``, as ``UNet(1)``)
    and an image-level type head on the pooled bottleneck (``both``): ``num_types`` logits, class 0 "good"."""

    def __init__(self, num_types: int, width: int = 16, depth: int = 3) -> None:
        super().__init__(1, width, depth)
        self.type_head = nn.Linear(width * 2**depth, num_types)

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, bottleneck = self.decode(x)
        return self.outc(features), self.type_head(bottleneck.mean(dim=(2, 3)))
