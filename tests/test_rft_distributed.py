"""Consistency-RFT data-parallel on torch.distributed (gloo on the CPU): two processes, each rolling out its share of
the prompts, give the same rewards, losses and LoRA weights as one process, and their checkpoint resumes in one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from test_rft import NANO, _config
from train_fixtures import checkpoint_weights, udg_fixture

from unidg.runtime.serve_client import free_loopback_port
from unidg.train.checkpoints import read_log
from unidg.train.config import to_dict
from unidg.train.rft import train_rft
from unidg.train.rft_config import RFTConfig

TOLERANCE = 1e-5


def _worker(rank: int, world: int, port: int, config_json: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then the real ``train_rft``."""
    from unidg.train.config import from_dict

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    train_rft(from_dict(RFTConfig, json.loads(config_json), "test config"), resume=True)


udg = udg_fixture(8)


def _two_prompt_config(udg: Path, output: Path, steps: int):
    config = _config(udg, output, steps=steps)
    config.train.batch_size = 2
    # Adam divides by sqrt(v) + eps: with the default 1e-8, gradient entries near zero (lora_A right after lora_B
    # leaves zero) turn float-summation-order noise into lr-sized steps; 1e-4 keeps the comparison about the sums.
    config.optim.eps = 1e-4
    return config


def test_two_processes_match_one_and_resume_in_one(tmp_path: Path, udg: Path) -> None:
    import torch.multiprocessing as mp

    assert NANO.is_dir()
    torch.set_num_threads(1)
    one = tmp_path / "one"
    train_rft(_two_prompt_config(udg, one, 2), resume=False)
    expected = read_log(one)

    two = tmp_path / "two"
    config_json = json.dumps(to_dict(_two_prompt_config(udg, two, 1)))
    mp.start_processes(_worker, args=(2, free_loopback_port(), config_json), nprocs=2, join=True, start_method="fork")
    log = read_log(two)
    assert [r["step"] for r in log] == [1]  # rank 0 alone writes the log
    for key in ("reward_mean", "reward_std", "policy_loss", "kl", "grad_norm", "transitions", "reward/color"):
        np.testing.assert_allclose(log[0][key], expected[0][key], rtol=0, atol=TOLERANCE)
    a, b = checkpoint_weights(two, 1), checkpoint_weights(one, 1)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOLERANCE

    train_rft(_two_prompt_config(udg, two, 2), resume=True)  # the 2-process checkpoint continues in one process
    log = read_log(two)
    assert [r["step"] for r in log] == [1, 2]
    np.testing.assert_allclose(log[1]["policy_loss"], expected[1]["policy_loss"], rtol=0, atol=TOLERANCE)
    a, b = checkpoint_weights(two, 2), checkpoint_weights(one, 2)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= TOLERANCE
