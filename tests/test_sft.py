"""Diversity-SFT trainer: losses, data order, a nano smoke run whose loss falls, exact resume, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import SETTINGS, nano_sft_config, udg_fixture

from unidg.train.checkpoints import (
    CHECKPOINTS,
    OPTIMIZER_JSON,
    OPTIMIZER_TENSORS,
    TRAINABLE_FILE,
    TrainingDivergedError,
    read_log,
)
from unidg.train.config import LoraConfig, LossConfig, OptimConfig, SFTConfig
from unidg.train.dataset import LatentPairs, build_example, target_token_mask
from unidg.train.flow import flow_matching_loss, normal_regularization, step_generator, step_inputs
from unidg.train.lora import lora_module_names
from unidg.train.model import UniDGModel
from unidg.train.pairs import DISTRIBUTIONS, prepare_pairs
from unidg.train.sft import setup_sft, train_sft
from unidg.train.trainer import distribution_sequence, sample_schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


udg = udg_fixture(12)


@pytest.fixture(scope="module")
def latents(udg: Path) -> LatentPairs:
    from unidg.train.config import settings_of

    config = _config(udg, Path("unused"))
    model = UniDGModel.from_preset("nano", seed=0)
    pairs = prepare_pairs(udg, seed=0)
    return LatentPairs.build(model, pairs, settings_of(config), with_normal=True)


def _config(udg: Path, output: Path, **loop) -> SFTConfig:
    return nano_sft_config(udg, output, **{"steps": 20, "batch_size": 3, "checkpoint_every": 0, **loop})


def _nano() -> UniDGModel:
    return UniDGModel.from_preset("nano", seed=0)


# ---------------------------------------------------------------------------------------------- pieces
def test_normal_regularization_is_eq9() -> None:
    z_normal = torch.randn(3, 5, 64)
    target = torch.zeros(3, 5, dtype=torch.bool)
    target[:2, :3] = True
    same = normal_regularization(z_normal.clone(), z_normal, target, tau=0.5)
    # samples 0, 1: cos = 1 -> ReLU(1 - 0.5) = 0.5; sample 2 has no target tokens -> 0; batch mean = 1/3.
    assert same.item() == pytest.approx(1.0 / 3.0, abs=1e-6)
    assert normal_regularization(-z_normal, z_normal, target, tau=0.5).item() == 0.0  # cos = -1: below the margin
    # Only target tokens count: changing a non-target token changes nothing.
    moved = z_normal.clone()
    moved[:, 4] = -moved[:, 4]
    assert normal_regularization(moved, z_normal, target).item() == pytest.approx(same.item(), abs=1e-6)
    # The gradient pushes the prediction away from the normal latents.
    prediction = z_normal.clone().add_(0.1 * torch.randn(3, 5, 64)).requires_grad_(True)
    normal_regularization(prediction, z_normal, target).backward()
    stepped = prediction.detach() - 1.0 * prediction.grad
    assert normal_regularization(stepped, z_normal, target) < normal_regularization(
        prediction.detach(), z_normal, target
    )


def test_flow_convention_matches_the_sampler(latents: LatentPairs) -> None:
    """x_t = t noise + (1 - t) x0 and v = noise - x0: one Euler step from t to 0 with the true v lands on x0."""
    batch = latents.batch([0, 1])
    x0 = batch["x0"]
    generator = step_generator(0, 1)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0.8, 0.3])[:, None, None]
    x_t = t * noise + (1 - t) * x0
    v = noise - x0
    x_next = x_t + (0.0 - t) * v  # the sampler's step x <- x + (sigma_next - sigma) v with sigma = t
    torch.testing.assert_close(x_next, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_t - t * v, x0, atol=1e-5, rtol=0)  # z0_hat of Eq. 9


def test_step_rng_is_a_function_of_seed_and_step() -> None:
    a = torch.randn(4, generator=step_generator(7, 12))
    assert torch.equal(a, torch.randn(4, generator=step_generator(7, 12)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(7, 13)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(8, 12)))


def test_mix_is_one_to_one_to_one_and_each_pass_uses_every_pair() -> None:
    assert distribution_sequence([1, 1, 1], 6).tolist() == [0, 1, 2, 0, 1, 2]
    assert set(distribution_sequence([1, 0, 0], 5).tolist()) == {0}
    pools = [np.arange(0, 4), np.arange(4, 7), np.arange(7, 12)]
    schedule = sample_schedule(pools, [1, 1, 1], steps=8, batch_size=3, seed=0)
    flat = schedule.reshape(-1)
    counts = [np.isin(flat, pool).sum() for pool in pools]
    assert counts == [8, 8, 8]
    first_pass = flat[np.isin(flat, pools[0])][:4]
    assert sorted(first_pass.tolist()) == [0, 1, 2, 3]  # every pair once per pass
    assert np.array_equal(schedule, sample_schedule(pools, [1, 1, 1], 8, 3, seed=0))
    assert not np.array_equal(schedule, sample_schedule(pools, [1, 1, 1], 8, 3, seed=1))
    with pytest.raises(ValueError, match="no training pairs"):
        sample_schedule([np.arange(0), np.arange(0), np.arange(3)], [1, 1, 0], 2, 2, 0)


def test_examples_follow_the_runtime_geometry(udg: Path, latents: LatentPairs) -> None:
    from unidg.core.settings import UniDGSettings

    pairs = prepare_pairs(udg, seed=0)
    assert {p.distribution for p in pairs} == set(DISTRIBUTIONS)  # the tiny set has all three distributions
    settings = UniDGSettings(**SETTINGS)
    example = build_example(pairs[0], settings, reference_size=64)
    size = settings.resolution
    assert example.source.shape == (size, 2 * size, 3) and example.mask.shape == (size, 2 * size)
    assert not example.mask[:, :size].any() and example.mask[:, size:].any()
    # D_res differs from the normal counterpart only in the right half (the defect), never in the reference half.
    assert np.array_equal(example.result[:, :size], example.normal[:, :size])
    assert not np.array_equal(example.result[:, size:], example.normal[:, size:])
    assert np.array_equal(example.source[:, :size], example.result[:, :size])
    grid = example.target_tokens.reshape(size // 16, 2 * size // 16)
    assert not grid[:, : size // 16].any() and grid.any()
    assert np.all(example.defect_tokens[example.target_tokens])
    assert np.array_equal(target_token_mask(example.defect_tokens, size), example.target_tokens)
    n = (size // 16) * (2 * size // 16)
    assert latents.tensors["x0"].shape[1:] == (n, 64) and latents.tensors["cond"].shape[1:] == (n, 320)
    assert latents.tensors["normal"].shape == latents.tensors["x0"].shape


def test_latent_cache_round_trip_and_staleness(tmp_path: Path, udg: Path, latents: LatentPairs) -> None:
    latents.save(tmp_path / "c.safetensors", "abc")
    loaded = LatentPairs.load(tmp_path / "c.safetensors", "abc")
    assert loaded is not None and loaded.keys == latents.keys
    for name, tensor in latents.tensors.items():
        assert torch.equal(loaded.tensors[name], tensor)
    assert LatentPairs.load(tmp_path / "c.safetensors", "other") is None  # a stale cache is rebuilt, never used


def test_lora_targets_double_and_single_blocks_only() -> None:
    model = _nano()
    names = lora_module_names(model.transformer, LoraConfig().targets)
    assert any(n.startswith("transformer_blocks.") and n.endswith("attn.add_k_proj") for n in names)
    assert any(n.startswith("single_transformer_blocks.") and n.endswith("proj_mlp") for n in names)
    assert "proj_out" not in names  # the output layer of the whole transformer stays frozen
    with pytest.raises(ValueError, match="match no linear layer"):
        lora_module_names(model.transformer, ["nonexistent"])


def test_defect_attention_reaches_the_loss(latents: LatentPairs) -> None:
    """The key bias (log alpha on defect tokens) changes the velocity: defect attention is really on."""
    from unidg.core.settings import UniDGSettings
    from unidg.train.model import image_ids

    model = _nano()
    settings = UniDGSettings(**SETTINGS)
    batch = latents.batch([0, 1, 2])
    on = step_inputs(batch, model, settings, defect_attention=True)
    off = step_inputs(batch, model, settings, defect_attention=False)
    assert on.key_bias is not None and torch.isclose(on.key_bias, torch.tensor(np.log(2.0), dtype=torch.float32)).any()
    ids = image_ids(4, 8)
    loss_on, _ = flow_matching_loss(model, on, step_generator(0, 1), LossConfig(), 1.0, ids)
    loss_off, _ = flow_matching_loss(model, off, step_generator(0, 1), LossConfig(), 1.0, ids)
    assert loss_on.item() != loss_off.item()


# ---------------------------------------------------------------------------------------------- runs
def test_smoke_run_loss_falls(tmp_path: Path, udg: Path, latents: LatentPairs) -> None:
    config = _config(udg, tmp_path / "run")
    run = train_sft(config, resume=False, model=_nano(), data=latents)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == list(range(1, 21))
    losses = [r["loss"] for r in log]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.9 * first, f"loss did not fall: first 5 mean {first:.4f}, last 5 mean {last:.4f}"
    assert all("normal_reg" in r and "velocity" in r and r["it_s"] > 0 for r in log)
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    info = json.loads((tmp_path / "run" / "lora.json").read_text())
    assert info["rank"] == 4 and info["steps"] == 20 and info["settings"]["resolution"] == 64
    assert len(info["modules"]) == len(run.lora_modules) > 0


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw"])
def test_resume_continues_the_same_loss_curve(tmp_path: Path, udg: Path, latents: LatentPairs, optimizer) -> None:
    optim = OptimConfig(name="adamw", lr=3e-3) if optimizer == "adamw" else OptimConfig(name="prodigy", lr=1.0)
    steps = 8
    straight = setup_sft(
        _config(udg, tmp_path / "straight", steps=steps, optim=optim), model=_nano(), data=latents
    ).trainer
    straight.run()
    expected = [r["loss"] for r in read_log(tmp_path / "straight")]

    interrupted_dir = tmp_path / "interrupted"
    config = _config(udg, interrupted_dir, steps=steps, checkpoint_every=4, optim=optim)
    first = setup_sft(config, model=_nano(), data=latents).trainer
    first.run(stop_after=6)  # dies after step 6; the last checkpoint is step 4
    assert (interrupted_dir / CHECKPOINTS / "step-000004").is_dir()
    checkpoint = interrupted_dir / CHECKPOINTS / "step-000004"
    assert (checkpoint / OPTIMIZER_TENSORS).is_file() and (checkpoint / OPTIMIZER_JSON).is_file()
    assert not list(checkpoint.glob("*.pt")) and not list(checkpoint.glob("*.bin"))  # no pickle anywhere

    resumed = setup_sft(config, model=_nano(), data=latents).trainer
    resumed.run(resume=True)
    assert resumed.step == steps
    log = read_log(interrupted_dir)
    assert [r["step"] for r in log] == list(range(1, steps + 1))  # steps 5-6 of the dead run were replaced
    got = [r["loss"] for r in log]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # The resumed LoRA weights equal the uninterrupted run's.
    for name, parameter in straight.trainable.items():
        torch.testing.assert_close(resumed.trainable[name], parameter, atol=1e-6, rtol=0)


def test_a_finished_run_resumed_with_more_steps_continues_as_a_longer_run(
    tmp_path: Path, udg: Path, latents: LatentPairs
) -> None:
    optim = OptimConfig(name="adamw", lr=3e-3)
    setup_sft(_config(udg, tmp_path / "long", steps=6, optim=optim), model=_nano(), data=latents).trainer.run()
    expected = [r["loss"] for r in read_log(tmp_path / "long")]
    short = _config(udg, tmp_path / "extended", steps=3, checkpoint_every=1, optim=optim)
    setup_sft(short, model=_nano(), data=latents).trainer.run()
    extended = _config(udg, tmp_path / "extended", steps=6, checkpoint_every=1, optim=optim)
    setup_sft(extended, model=_nano(), data=latents).trainer.run(resume=True)
    log = read_log(tmp_path / "extended")
    assert [r["step"] for r in log] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in log], expected, rtol=0, atol=1e-6)
    # Going back is refused: the checkpoint is past the shorter run's end.
    with pytest.raises(ValueError, match="past this run's 2 steps"):
        shorter = _config(udg, tmp_path / "extended", steps=2, checkpoint_every=1, optim=optim)
        setup_sft(shorter, model=_nano(), data=latents).trainer.run(resume=True)


def test_schedule_prefix_does_not_depend_on_the_step_count() -> None:
    pools = [np.arange(5), np.arange(5, 12), np.arange(12, 15)]
    long = sample_schedule(pools, [1.0, 1.0, 1.0], 40, 4, seed=3)
    np.testing.assert_array_equal(sample_schedule(pools, [1.0, 1.0, 1.0], 9, 4, seed=3), long[:9])


def test_resume_refuses_another_run(tmp_path: Path, udg: Path, latents: LatentPairs) -> None:
    config = _config(udg, tmp_path / "r", steps=2, checkpoint_every=1)
    setup_sft(config, model=_nano(), data=latents).trainer.run()
    other = _config(udg, tmp_path / "r", steps=2, checkpoint_every=1)
    other.seed = 1
    with pytest.raises(ValueError, match="different run"):
        setup_sft(other, model=_nano(), data=latents).trainer.run(resume=True)


def test_bf16_and_gradient_checkpointing_run(tmp_path: Path, udg: Path, latents: LatentPairs) -> None:
    config = _config(udg, tmp_path / "bf16", steps=2, precision="bf16", gradient_checkpointing=True)
    setup_sft(config, model=_nano(), data=latents).trainer.run()
    log = read_log(tmp_path / "bf16")
    assert len(log) == 2 and all(np.isfinite(r["loss"]) for r in log)


def test_eval_nano_counts_a_transfer_by_the_nearest_colour(udg: Path) -> None:
    from unidg.train.eval_nano import evaluation_pairs, transfer_scores

    source = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    red = np.array([200.0, 30.0, 30.0])
    painted = source.copy()
    painted[mask] = (180, 40, 40)
    to_reference, to_source = transfer_scores(painted, source, mask, red)
    assert to_reference < to_source  # painted towards the reference defect: a transfer
    to_reference, to_source = transfer_scores(source, source, mask, red)
    assert to_source == 0.0 and to_reference > 0  # an untouched source never counts
    pairs = evaluation_pairs(udg, 6, seed=0)
    assert [p.distribution for p in pairs].count("defect-fill") == 2 and len(pairs) == 6


def test_a_step_that_makes_a_weight_non_finite_stops_and_keeps_the_last_finite_checkpoint(
    tmp_path: Path, udg: Path, latents: LatentPairs
) -> None:
    run_dir = tmp_path / "run"
    trainer = setup_sft(_config(udg, run_dir, steps=4, checkpoint_every=1), model=_nano(), data=latents).trainer
    trainer.run(stop_after=1)
    trainer.base_lrs = [math.inf for _ in trainer.base_lrs]  # bypasses the config check: NaN weights at step 2
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 2: .*(nan|non-finite).*step-000001 is kept"):
        trainer.run()
    assert sorted(p.name for p in (run_dir / CHECKPOINTS).iterdir()) == ["step-000001"]
    kept = load_file(str(run_dir / CHECKPOINTS / "step-000001" / TRAINABLE_FILE))
    assert kept and all(bool(torch.isfinite(tensor).all()) for tensor in kept.values())
    modes = {p.name: p.stat().st_mode & 0o777 for p in (run_dir / CHECKPOINTS / "step-000001").iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors' 0600 made like the JSON files beside them
    assert [r["step"] for r in read_log(run_dir)] == [1]
