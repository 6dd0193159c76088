"""Downstream models: ResNet-34 in torchvision's layout (state_dict names and shapes), U-Net shapes."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from unidg.train.detectors import ResNet34, UNet
from unidg.train.evaluation.detector_training import as_input


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


NARROW_RESNET_STRESS = """
import numpy as np, torch
from unidg.train.detectors import ResNet34
from unidg.train.evaluation.detector_training import as_input
torch.set_num_threads(2)
torch.manual_seed(0)
model = ResNet34(2, 4)
x = as_input(np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8))
with torch.no_grad():
    stem = model.layer1(model.maxpool(model.relu(model.bn1(model.conv1(x)))))
for _ in range(20):  # layer2's first block: its 4 -> 8 stride-2 1x1 downsample is where channels-last input crashed
    model.layer2[0](stem.clone().requires_grad_(True)).sum().backward()
print("ok")
"""


def test_a_width_4_resnet_trains_on_contiguous_input_without_corrupting_the_heap() -> None:
    """With the channels-last view as_input used to return, this crashed within 7 backward passes in every run
    (SIGSEGV or "corrupted double-linked list"); run in a subprocess so a crash fails the test, not pytest."""
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    assert as_input(images).is_contiguous()
    env = {**os.environ, "MALLOC_CHECK_": "3"}  # glibc aborts at the first heap inconsistency
    result = subprocess.run(
        [sys.executable, "-c", NARROW_RESNET_STRESS], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-500:])
