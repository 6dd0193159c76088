"""Downstream models: ResNet-34 in torchvision's layout (state_dict names and shapes), U-Net shapes."""

from __future__ import annotations

import pytest
import torch

from unidg.train.detectors import ResNet34, UNet


def test_resnet34_matches_torchvision_layout_by_construction() -> None:
    model = ResNet34(num_classes=1000)
    state = model.state_dict()
    # torchvision's documented resnet34 (IMAGENET1K_V1): 21,797,672 parameters.
    assert sum(p.numel() for p in model.parameters()) == 21_797_672
    expected = {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.2.conv2.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,),
        "layer3.5.bn2.num_batches_tracked": (),
        "layer4.0.conv1.weight": (512, 256, 3, 3),
        "layer4.2.bn2.weight": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert "layer1.0.downsample.0.weight" not in state  # stage 1 keeps 64 channels at stride 1: no downsample
    # 3 + 4 + 6 + 3 blocks, 5 tensors per BatchNorm: torchvision's state_dict has 218 entries.
    assert len(state) == 218
    assert sum(1 for key in state if key.startswith("layer3.") and key.endswith(".conv1.weight")) == 6


def test_resnet34_and_unet_forward_shapes() -> None:
    logits = ResNet34(num_classes=5, width=8).eval()(torch.zeros(2, 3, 64, 64))
    assert logits.shape == (2, 5)
    unet = UNet(num_classes=4, width=4, depth=3).eval()
    assert unet(torch.zeros(1, 3, 32, 40)).shape == (1, 4, 32, 40)
    with pytest.raises(ValueError, match="multiples of 8"):
        unet(torch.zeros(1, 3, 30, 32))
