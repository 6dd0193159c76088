"""Data-parallel training on torch.distributed (gloo on the CPU): two processes give the same loss curve and LoRA
weights as one process with the same global batch, a checkpoint from two processes resumes in one, gradient
accumulation equals one big batch, and bad devices / world sizes are refused clearly."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import checkpoint_weights, nano_sft_config, udg_fixture

from unidg.runtime.serve_client import free_loopback_port
from unidg.train.checkpoints import CHECKPOINTS, read_log
from unidg.train.config import LossConfig, SFTConfig, from_dict
from unidg.train.config import to_dict as config_to_dict
from unidg.train.dataset import LatentPairs
from unidg.train.model import UniDGModel
from unidg.train.sft import setup_sft, train_sft
from unidg.train.trainer import DeviceError, Placement, resolve_device

CACHE_KEY = "distributed-test"
TOLERANCE = 1e-5


def _config(udg: Path, output: Path, **loop) -> SFTConfig:
    loss = LossConfig(normal_reg_weight=0.5, mask_weight=2.0)
    return nano_sft_config(
        udg, output, loss=loss, **{"batch_size": 4, "checkpoint_every": 1, "keep_checkpoints": 8, **loop}
    )


def _nano() -> UniDGModel:
    return UniDGModel.from_preset("nano", seed=0)


def _worker(rank: int, world: int, port: int, data_path: str, config_json: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then the real ``train_sft``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    config = from_dict(SFTConfig, json.loads(config_json), "test config")
    data = LatentPairs.load(data_path, CACHE_KEY)
    train_sft(config, resume=True, model=_nano(), data=data)


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


udg = udg_fixture(12)


@pytest.fixture(scope="module")
def latents(udg: Path, tmp_path_factory) -> tuple[LatentPairs, Path]:
    from unidg.train.config import settings_of
    from unidg.train.pairs import prepare_pairs

    pairs = prepare_pairs(udg, seed=0)
    data = LatentPairs.build(_nano(), pairs, settings_of(_config(udg, Path("unused"))), with_normal=True)
    path = tmp_path_factory.mktemp("latents") / "latents.safetensors"
    data.save(path, CACHE_KEY)
    return data, path


def test_two_processes_match_one_and_resume_in_one(tmp_path: Path, udg: Path, latents) -> None:
    import torch.multiprocessing as mp

    data, data_path = latents
    one = tmp_path / "one"
    train_sft(_config(udg, one, steps=4), resume=False, model=_nano(), data=data)
    expected = [r["loss"] for r in read_log(one)]

    two = tmp_path / "two"
    config_json = json.dumps(config_to_dict(_config(udg, two, steps=2)))
    # fork: the workers inherit the imported modules (spawn would re-import torch and diffusers in each).
    mp.start_processes(
        _worker, args=(2, free_loopback_port(), str(data_path), config_json), nprocs=2, join=True, start_method="fork"
    )
    log = read_log(two)
    assert [r["step"] for r in log] == [1, 2]  # rank 0 alone writes the log
    np.testing.assert_allclose([r["loss"] for r in log], expected[:2], rtol=0, atol=TOLERANCE)
    assert _max_difference(checkpoint_weights(two, 2), checkpoint_weights(one, 2)) <= TOLERANCE
    assert json.loads((two / CHECKPOINTS / "step-000002" / "state.json").read_text())["world_size"] == 2
    assert json.loads((two / "lora.json").read_text())["world_size"] == 2

    # The 2-process checkpoint continues in 1 process on the same curve, to the same weights.
    train_sft(_config(udg, two, steps=4), resume=True, model=_nano(), data=data)
    log = read_log(two)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in log], expected, rtol=0, atol=TOLERANCE)
    assert _max_difference(checkpoint_weights(two, 4), checkpoint_weights(one, 4)) <= TOLERANCE


def test_gradient_accumulation_equals_one_batch(tmp_path: Path, udg: Path, latents) -> None:
    data, _ = latents
    whole = setup_sft(_config(udg, tmp_path / "whole", steps=2), model=_nano(), data=data).trainer
    whole.run()
    accumulated = setup_sft(_config(udg, tmp_path / "acc", steps=2, micro_batch=1), model=_nano(), data=data).trainer
    assert accumulated.accumulation == 4
    accumulated.run()
    np.testing.assert_allclose(
        [r["loss"] for r in read_log(tmp_path / "acc")],
        [r["loss"] for r in read_log(tmp_path / "whole")],
        rtol=0,
        atol=TOLERANCE,
    )
    assert (
        _max_difference(checkpoint_weights(tmp_path / "acc", 2), checkpoint_weights(tmp_path / "whole", 2)) <= TOLERANCE
    )


def test_a_world_size_that_does_not_divide_the_global_batch_is_refused(tmp_path: Path, udg: Path, latents) -> None:
    data, _ = latents
    three = Placement(torch.device("cpu"), rank=0, world_size=3)
    with pytest.raises(ValueError, match=r"train.batch_size 4 \(the global batch\) does not split over 3 processes"):
        setup_sft(_config(udg, tmp_path / "r", steps=1), model=_nano(), data=data, placement=three)
    with pytest.raises(ValueError, match="train.micro_batch 3 does not divide"):
        setup_sft(_config(udg, tmp_path / "r", steps=1, micro_batch=3), model=_nano(), data=data)
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the refusal needs a machine without")
def test_cuda_without_cuda_is_refused(tmp_path: Path, udg: Path, capsys) -> None:
    with pytest.raises(DeviceError, match="--device cuda: no CUDA device is available.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="use cpu, cuda or cuda:N"):
        resolve_device("gpu")
    from unidg.cli import main

    config = tmp_path / "c.json"
    config.write_text(json.dumps(config_to_dict(replace(_config(udg, tmp_path / "run"), base=str(tmp_path)))))
    assert main(["train", "sft", "--config", str(config), "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
