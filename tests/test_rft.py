"""``unidg train rft`` on the shipped UniDG-nano weights at a tiny resolution: the reference policy is the merged
SFT model, a step trains the new LoRA, resume equals an uninterrupted run, merge exports a loadable folder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fs_fixtures import immutable
from PIL import Image
from test_judge import server  # noqa: F401  (the local judge server fixture)
from train_fixtures import udg_fixture

from unidg.cli import main
from unidg.train.config import ConfigError, DataConfig, LoraConfig, OptimConfig
from unidg.train.loading import load_model
from unidg.train.merge import merge_lora, probe_inputs, probe_velocity
from unidg.train.rewards import ColorConfig, RewardConfig
from unidg.train.rft import RFTRun, train_rft
from unidg.train.rft_config import GRPOConfig, RFTConfig, RFTLoopConfig, RolloutConfig, load_rft_config
from unidg.train.rft_policy import adapters_disabled

NANO = Path(__file__).resolve().parents[1] / "runtime" / "assets" / "unidg-nano"
SETTINGS = {"resolution": 32}  # 2 x 4 image tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


udg = udg_fixture(8)


def _config(udg: Path, output: Path, steps: int = 3, **grpo) -> RFTConfig:
    return RFTConfig(
        base=str(NANO),
        output=str(output),
        seed=1,
        data=DataConfig(train=str(udg)),
        lora=LoraConfig(rank=4, alpha=8.0),
        optim=OptimConfig(name="adamw", lr=3e-3, weight_decay=0.0),
        rollout=RolloutConfig(group_size=2, steps=[1, 2], cfg_scales=[1.0, 2.0], guidance=-1.0),
        grpo=GRPOConfig(clip_range=0.2, beta=0.01, inner_epochs=2, **grpo),
        reward=RewardConfig(color=ColorConfig(weight=1.0)),
        train=RFTLoopConfig(steps=steps, batch_size=1, checkpoint_every=1, progress=False),
        settings=dict(SETTINGS),
    )


def test_a_step_trains_the_lora_and_disabling_it_gives_the_sft_model(udg, tmp_path) -> None:
    run = RFTRun(_config(udg, tmp_path / "run", steps=1))
    record = run.run(resume=False)[0]
    assert set(record) >= {"reward_mean", "reward_std", "policy_loss", "kl", "clip_fraction", "reward/color"}
    assert record["transitions"] >= 2 and record["grad_norm"] > 0 and record["kl"] >= 0
    lora_b = [p for name, p in run.trainable.items() if "lora_B" in name]
    assert any(float(p.detach().abs().max()) > 0 for p in lora_b)  # lora_B starts at zero: the step moved it
    base = load_model(NANO)
    base.settings = run.settings
    probe = probe_inputs(base)
    expected = probe_velocity(base.eval(), probe, 1.0)
    with adapters_disabled(run.model.transformer):
        assert torch.allclose(probe_velocity(run.model, probe, 1.0), expected, atol=1e-6)
    assert not torch.allclose(probe_velocity(run.model, probe, 1.0), expected, atol=1e-6)


def test_rollouts_use_the_deployed_guidance_and_the_kl_scale_is_delta_t(udg, tmp_path, monkeypatch) -> None:
    """Defaults: rollouts at the weights' own guidance (what SFT trained at and inference uses), the KL on Flow-GRPO's
    scale (each transition's KL times its sigma - sigma_next), the paper's clip 1e-5, which one update per rollout
    batch never reaches in fp32: the ratio differs from 1 by recomputation rounding only."""
    from unidg.train import rft

    defaults = RFTConfig(base="b", output="o")
    assert defaults.rollout.guidance < 0 and defaults.grpo.clip_range == 1e-5
    assert defaults.grpo.kl_variance == "flow_grpo"
    guidances, scales = [], []
    real_velocity, real_loss = rft.guided_velocity, rft.grpo_loss

    def velocity_spy(model, x, sigma, prompts, guidance, *args):
        guidances.append(guidance)
        return real_velocity(model, x, sigma, prompts, guidance, *args)

    def loss_spy(*args, kl_scale=None, **kwargs):
        scales.append(kl_scale)
        return real_loss(*args, kl_scale=kl_scale, **kwargs)

    monkeypatch.setattr(rft, "guided_velocity", velocity_spy)
    monkeypatch.setattr(rft, "grpo_loss", loss_spy)
    config = _config(udg, tmp_path / "run", steps=1)
    config.rollout.steps, config.rollout.guidance = [2], -1.0
    config.grpo = GRPOConfig(beta=0.01, inner_epochs=1)
    run = RFTRun(config)
    record = run.run(resume=False)[0]
    assert set(guidances) == {run.settings.guidance} and run.settings.guidance != 3.5
    from unidg.runtime.sampler import sampling_sigmas

    sigmas = sampling_sigmas(2, 8)
    assert scales and all(s is not None for s in scales)
    assert sorted(set(torch.cat(scales).tolist())) == pytest.approx(sorted(set((sigmas[:-1] - sigmas[1:]).tolist())))
    assert record["clip_fraction"] == 0.0 and record["ratio_deviation"] < 1e-6
    config.grpo.kl_variance = "step"
    config.output = str(tmp_path / "exact")
    scales.clear()
    RFTRun(config).run(resume=False)
    assert scales and all(s is None for s in scales)  # the exact KL: no scale


def test_resume_equals_an_uninterrupted_run(udg, tmp_path) -> None:
    whole = RFTRun(_config(udg, tmp_path / "whole"))
    records = whole.run(resume=False)
    first = RFTRun(_config(udg, tmp_path / "split"))
    first.run(resume=False, stop_after=2)
    second = RFTRun(_config(udg, tmp_path / "split"))  # a fresh process: weights, EMA, optimizer from the checkpoint
    resumed = second.run(resume=True)
    assert second.step == 3 and [r["step"] for r in resumed] == [3]
    for key in ("reward_mean", "policy_loss", "kl", "grad_norm"):
        assert resumed[0][key] == pytest.approx(records[2][key], abs=1e-6)
    for name, parameter in whole.trainable.items():
        assert torch.allclose(second.trainable[name], parameter, atol=1e-6, rtol=0)
        assert torch.allclose(second.ema[name], whole.ema[name], atol=1e-6, rtol=0)
    log = [json.loads(line) for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]


def test_rft_command_then_merge_gives_a_loadable_weights_folder(udg, tmp_path, capsys) -> None:
    config = tmp_path / "rft.toml"
    config.write_text(
        f"""base = "{NANO}"
output = "{tmp_path / "run"}"
seed = 2
[data]
train = "{udg}"
[settings]
resolution = 32
[lora]
rank = 4
alpha = 8.0
[optim]
name = "adamw"
lr = 3e-3
[rollout]
group_size = 2
steps = [1]
guidance = -1.0
[grpo]
ema_decay = 0.5
[reward.color]
weight = 1.0
[train]
steps = 2
progress = false
"""
    )
    assert main(["train", "rft", "--config", str(config)]) == 0
    assert "unidg train merge" in capsys.readouterr().out
    info = json.loads((tmp_path / "run" / "lora.json").read_text())
    assert info["stage"] == "consistency-rft" and info["weights"] == "ema" and info["rank"] == 4
    curves = Image.open(tmp_path / "run" / "curves.png")  # reward and KL per step, written at the end of the run
    assert curves.size == (1300, 360) and len(np.unique(np.asarray(curves.convert("L")))) > 2
    report = merge_lora(NANO, tmp_path / "run", tmp_path / "merged")
    assert report["merge"]["max_abs_diff_vs_unmerged"] <= 1e-4 and report["merge"]["max_abs_lora_effect"] > 0
    merged = load_model(tmp_path / "merged")
    assert merged.settings.resolution == 32
    probe = probe_inputs(merged)
    base = load_model(NANO)
    base.settings = merged.settings
    assert not torch.allclose(probe_velocity(merged, probe, 1.0), probe_velocity(base, probe, 1.0), atol=1e-7)


def test_bad_configs_fail_at_start(udg, tmp_path) -> None:
    path = tmp_path / "rft.toml"
    body = f'base = "{NANO}"\noutput = "{tmp_path / "o"}"\n[data]\ntrain = "{udg}"\n'
    path.write_text(body + '[reward.judge]\nweight = 0.5\nurl = "http://127.0.0.1:9/v1"\n')
    with pytest.raises(ConfigError, match="judge.model"):
        load_rft_config(path)
    path.write_text(body + "[reward.color]\nweight = 1.0\n[rollout]\ngroup_size = 1\n")
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_rft_config(path)
    path.write_text(body + "[reward.color]\nweight = 1.0\n[train]\neval_every = 2\n")
    with pytest.raises(ConfigError, match="data.heldout"):
        load_rft_config(path)
    config = _config(udg, tmp_path / "o")
    config.base = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="merged SFT weights"):
        train_rft(config)


@pytest.mark.parametrize("name", ["nano-rft.toml", "full-rft.toml"])
def test_shipped_rft_configs_are_valid(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(__file__).resolve().parents[1] / "configs" / name
    monkeypatch.chdir(tmp_path)  # the configs' relative reward folder, absent here whatever the checkout holds
    with pytest.raises(ConfigError, match="recog.checkpoint"):  # trained by `unidg train reward-recog` first
        load_rft_config(path)
    (tmp_path / "recog").mkdir()
    (tmp_path / "recog" / "recog.json").write_text("{}")  # where a trained reward folder would be
    config = load_rft_config(path, [f'reward.recog.checkpoint="{tmp_path / "recog"}"'])
    assert config.reward.recog.weight == 0.5
    # The paper's settings (App. D.2): new LoRA r = 64, alpha = 128, G = 8, T = 8, AdamW 1e-4, beta = 0.001.
    assert (config.lora.rank, config.lora.scale_alpha, config.rollout.group_size) == (64, 128.0, 8)
    assert config.rollout.steps == [8] and config.optim.name == "adamw" and config.optim.lr == 1e-4
    assert config.grpo.beta == 0.001 and config.grpo.adv_eps == 1e-5 and config.grpo.clip_range == 1e-5
    assert config.grpo.kl_variance == "flow_grpo"
    assert config.rollout.guidance < 0  # the weights' own guidance, as SFT and inference (docs/training.md)
    if name.startswith("full"):
        assert config.reward.judge.weight == 0.5


def test_a_judge_that_goes_down_stops_the_run_clearly_and_it_resumes(udg, tmp_path, server) -> None:  # noqa: F811
    from test_judge import FakeJudge

    from unidg.train.judge import JudgeConfig, JudgeError

    def config(output: Path) -> RFTConfig:
        judge = JudgeConfig(weight=1.0, url=server, model="m", retries=1, backoff_s=0.01, timeout_s=5.0)
        rft = _config(udg, output, steps=2)
        rft.reward = RewardConfig(judge=judge)
        rft.rollout.steps, rft.rollout.cfg_scales = [1], [1.0]
        return rft

    whole = train_rft(config(tmp_path / "whole"), resume=False)
    requests = len(FakeJudge.seen)
    assert requests == 4  # 2 steps x G = 2 samples, one request each
    FakeJudge.script = ["ok", "ok"] + ["500"] * 4  # step 1 scores; in step 2 both samples fail every attempt
    with pytest.raises(JudgeError, match="after 2 attempts: HTTP 500"):
        train_rft(config(tmp_path / "split"), resume=False)
    resumed = train_rft(config(tmp_path / "split"), resume=True)  # the server is back: step 2 from the checkpoint
    assert resumed.step == 2
    for name, parameter in whole.trainable.items():
        assert torch.allclose(resumed.trainable[name], parameter, atol=1e-6, rtol=0)


def test_an_infinite_lr_or_beta_is_refused_before_training(udg, tmp_path, capsys) -> None:
    """`unidg train rft --set optim.lr=inf` used to save an all-NaN LoRA, exit 0 and suggest merging it."""
    config = tmp_path / "rft.toml"
    config.write_text(
        f'base = "{NANO}"\noutput = "{tmp_path / "run"}"\n[data]\ntrain = "{udg}"\n[settings]\nresolution = 32\n'
        '[lora]\nrank = 4\n[optim]\nname = "adamw"\n[rollout]\ngroup_size = 2\nsteps = [1]\nguidance = -1.0\n'
        "[reward.color]\nweight = 1.0\n[train]\nsteps = 1\nprogress = false\n"
    )
    for override in ("optim.lr=inf", "grpo.beta=inf"):
        assert main(["train", "rft", "--config", str(config), "--set", override]) == 2
        captured = capsys.readouterr()
        assert f"{override.split('=')[0]} must be a finite number (got inf)" in captured.err
        assert "Traceback" not in captured.err and "unidg train merge" not in captured.out
        assert not (tmp_path / "run").exists()


def test_a_step_that_makes_a_weight_non_finite_stops_and_keeps_the_last_finite_checkpoint(udg, tmp_path) -> None:
    from safetensors.torch import load_file

    from unidg.train.checkpoints import CHECKPOINTS, TRAINABLE_FILE, TrainingDivergedError

    run = RFTRun(_config(udg, tmp_path / "run", steps=3))
    run.run(resume=False, stop_after=1)
    for group in run.optimizer.param_groups:
        group["lr"] = math.inf  # bypasses the config check: step 2 makes NaN weights (inf * 0)
    with pytest.raises(TrainingDivergedError, match=r"diverged at step 2: .*(nan|non-finite).*step-000001 is kept"):
        run.run(resume=False)
    folder = tmp_path / "run" / CHECKPOINTS
    assert sorted(p.name for p in folder.iterdir()) == ["step-000001"]
    kept = load_file(str(folder / "step-000001" / TRAINABLE_FILE))
    assert kept and all(bool(torch.isfinite(tensor).all()) for tensor in kept.values())
    assert not (tmp_path / "run" / "lora.safetensors").exists()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (folder / "step-000001").iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors' 0600 made like the JSON files beside them


def test_an_output_that_is_a_file_or_unwritable_is_refused_before_training(udg, tmp_path, capsys) -> None:
    blocker = tmp_path / "run.txt"
    blocker.write_text("mine")
    with pytest.raises(ConfigError, match=r"output .*run.txt is a file; name a run folder"):
        train_rft(_config(udg, blocker))
    with pytest.raises(ConfigError, match=r"output .*run.txt/run: .*run.txt is a file, not a folder"):
        train_rft(_config(udg, blocker / "run"))
    assert blocker.read_text() == "mine"
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    with immutable(frozen), pytest.raises(ConfigError, match=r"output .*frozen/run: .*frozen is not writable"):
        train_rft(_config(udg, frozen / "run"))
    assert list(frozen.iterdir()) == []
