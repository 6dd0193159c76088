"""Training configs: loading TOML/JSON, overrides, and clear refusals of bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unidg.train.config import (
    BaseConfig,
    ConfigError,
    SFTConfig,
    load_base_config,
    load_sft_config,
    settings_of,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]

MINIMAL_SFT = """
base = "out/base"
output = "out/sft"
[data]
train = "out/data"
"""


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_minimal_sft_config_takes_paper_defaults(tmp_path: Path) -> None:
    config = load_sft_config(_write(tmp_path, MINIMAL_SFT))
    assert isinstance(config, SFTConfig)
    assert config.lora.rank == 256  # paper: rank 256 on double and single blocks
    assert config.optim.name == "prodigy" and config.optim.weight_decay == 0.01
    assert config.loss.normal_reg_tau == 0.5
    assert (config.loss.logit_mean, config.loss.logit_std) == (0.0, 1.0)
    assert config.train.mix == [1.0, 1.0, 1.0]
    assert any(t.endswith("proj_mlp") for t in config.lora.targets)  # single blocks
    assert any(t.endswith("add_q_proj") for t in config.lora.targets)  # double blocks (context stream)


def test_json_and_toml_give_the_same_config(tmp_path: Path) -> None:
    toml = load_sft_config(_write(tmp_path, MINIMAL_SFT + "[lora]\nrank = 8\n"))
    data = {"base": "out/base", "output": "out/sft", "data": {"train": "out/data"}, "lora": {"rank": 8}}
    js = load_sft_config(_write(tmp_path, json.dumps(data), "c.json"))
    assert to_dict(toml) == to_dict(js)


def test_int_is_accepted_for_float_and_overrides_apply(tmp_path: Path) -> None:
    config = load_sft_config(
        _write(tmp_path, MINIMAL_SFT + "[optim]\nlr = 1\n"),
        overrides=["train.steps=20", "optim.name=adamw", "lora.targets=['to_q']", "settings.alpha=3"],
    )
    assert config.optim.lr == 1.0 and isinstance(config.optim.lr, float)
    assert config.train.steps == 20
    assert config.optim.name == "adamw"
    assert config.lora.targets == ["to_q"]
    assert settings_of(config).alpha == 3.0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[train]\nstepz = 3\n", "[train] unknown key(s) ['stepz']"),
        ("[train]\nsteps = 'ten'\n", "train.steps must be an integer (got 'ten')"),
        ("[train]\nsteps = 0\n", "train.steps must be >= 1 (got 0)"),
        ("[train]\nprecision = 'fp8'\n", "train.precision must be 'fp32' or 'bf16'"),
        ("[train]\nmix = [1, 1]\n", "train.mix must be three weights"),
        ("[optim]\nname = 'sgd'\n", "optim.name must be 'prodigy' or 'adamw'"),
        ("[optim]\nbetas = [0.9, 1.5]\n", "optim.betas must be two numbers in [0, 1)"),
        ("[lora]\nrank = 0\n", "lora.rank must be >= 1"),
        ("[lora]\ntargets = 'to_q'\n", "lora.targets must be a list of a string"),
        ("[loss]\nnormal_reg_weight = -1\n", "loss.normal_reg_weight must be >= 0"),
        ("[settings]\nalpha = -2\n", "[settings] alpha must be > 0"),
        ("[settings]\nalfa = 2\n", "[settings] unknown UniDG settings ['alfa']"),
        ("[train]\nbatch_size = true\n", "train.batch_size must be an integer (got True)"),
        ("[train]\ndevice = 'gpu'\n", "train.device must be 'cpu', 'cuda' or 'cuda:N' (got 'gpu')"),
        ("[train]\nmicro_batch = -1\n", "train.micro_batch must be >= 0"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(tmp_path: Path, extra: str, message: str) -> None:
    path = _write(tmp_path, MINIMAL_SFT + extra)
    with pytest.raises(ConfigError) as info:
        load_sft_config(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)  # names the file


def test_missing_required_keys_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'base' is required"):
        load_sft_config(_write(tmp_path, 'output = "x"\n[data]\ntrain = "d"\n'))
    with pytest.raises(ConfigError, match=r"\[data\] train is required"):
        load_sft_config(_write(tmp_path, 'base = "b"\noutput = "x"\n'))
    with pytest.raises(ConfigError, match="not found"):
        load_sft_config(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="must end in .toml or .json"):
        load_sft_config(_write(tmp_path, MINIMAL_SFT, "c.yaml"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_sft_config(_write(tmp_path, "base = \n"))
    with pytest.raises(ConfigError, match="expected SECTION.KEY=VALUE"):
        load_sft_config(_write(tmp_path, MINIMAL_SFT), overrides=["train.steps"])


def test_base_config_validation(tmp_path: Path) -> None:
    text = 'output = "out/b"\n[data]\ntrain = "d"\n'
    config = load_base_config(_write(tmp_path, text))
    assert isinstance(config, BaseConfig) and config.preset == "nano"
    with pytest.raises(ConfigError, match="vae.crop must be a multiple of 16"):
        load_base_config(_write(tmp_path, text + "[vae]\ncrop = 40\n"))
    with pytest.raises(ConfigError, match="preset must be 'nano' or 'full'"):
        load_base_config(_write(tmp_path, 'preset = "tiny"\n' + text))


@pytest.mark.parametrize("name", ["nano-base.toml", "nano-sft.toml"])
def test_shipped_configs_are_valid(name: str) -> None:
    path = REPO / "configs" / name
    if not path.is_file():
        pytest.fail(f"configs/{name} is missing")
    loader = load_base_config if name.endswith("base.toml") else load_sft_config
    config = loader(path)
    assert settings_of(config).resolution in (128, 256)


def test_device_option_overrides_the_config(tmp_path: Path) -> None:
    from unidg.train.commands_train import _overrides

    class Args:
        overrides: list[str] = []
        out = None
        device = "cuda:1"

    config = load_sft_config(_write(tmp_path, MINIMAL_SFT), overrides=_overrides(Args()))
    assert config.train.device == "cuda:1"
    with pytest.raises(ConfigError, match="data.shard_size must be >= 1"):
        load_sft_config(_write(tmp_path, MINIMAL_SFT), overrides=["data.shard_size=0"])
