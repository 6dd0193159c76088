"""UniDG-Text fine-tuning (``unidg train text``): both instruction forms mixed in each batch, text features cached
with the latents and keyed by the encoders and the instruction seed, checkpoints and exact resume through the SFT
trainer, the merged folder's text record, and bad inputs refused by name."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from train_fixtures import udg_fixture

from unidg.cli import main
from unidg.core.instructions import REFERENCE_INSTRUCTION
from unidg.core.settings import UniDGSettings
from unidg.core.udg import read_index
from unidg.runtime.serve_client import free_loopback_port
from unidg.train.checkpoints import CHECKPOINTS, TRAINABLE_FILE, read_log
from unidg.train.config import (
    ConfigError,
    DataConfig,
    LoopConfig,
    LoraConfig,
    LossConfig,
    OptimConfig,
    from_dict,
    settings_of,
    to_dict,
)
from unidg.train.dataset import build_example
from unidg.train.latent_cache import LatentCacheError, open_cache, read_manifest
from unidg.train.loading import load_model, save_model
from unidg.train.merge import merge_lora
from unidg.train.model import UniDGModel
from unidg.train.pairs import prepare_pairs
from unidg.train.text_encoders import TextEncoderError, make_text_encoders, save_text_encoders
from unidg.train.text_sft import (
    TEXT_FEATURES_FILE,
    TEXT_FORMS,
    TextConfig,
    TextSFTConfig,
    load_text_config,
    prepare_encoders,
    text_mode,
    text_pairs,
    text_training_data,
    train_text,
    with_base_settings,
)
from unidg.train.trainer import Placement, sample_schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


udg = udg_fixture(8, size=32)


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """A nano weights folder whose manifest says what `unidg train merge` writes (stage "merged")."""
    model = UniDGModel.from_preset("nano", seed=0, settings=UniDGSettings(resolution=32, text_tokens=8, guidance=1.0))
    return save_model(model, tmp_path_factory.mktemp("w") / "sft", metadata={"stage": "merged", "merge": {}})


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Path:
    return save_text_encoders(make_text_encoders("nano", seed=0), tmp_path_factory.mktemp("enc") / "flux")


def _config(udg: Path, base: Path, output: Path, encoders: Path | None = None, **text):
    text = {"encoders": str(encoders) if encoders else "", "random_encoders": "" if encoders else "nano", **text}
    config = TextSFTConfig(
        base=str(base),
        output=str(output),
        data=DataConfig(train=str(udg)),
        lora=LoraConfig(rank=4, alpha=4.0),
        optim=OptimConfig(name="adamw", lr=1e-3),
        loss=LossConfig(normal_reg_weight=0.1),
        train=LoopConfig(steps=2, batch_size=4, progress=False, checkpoint_every=1),
        settings={"text_tokens": 16},
        text=TextConfig(**text),
    )
    config.validate("test")
    return config


def _toml(path: Path, udg: Path, base: Path, output: Path) -> Path:
    path.write_text(
        f'base = "{base}"\noutput = "{output}"\n[data]\ntrain = "{udg}"\n[settings]\ntext_tokens = 16\n'
        '[lora]\nrank = 4\nalpha = 4.0\n[optim]\nname = "adamw"\nlr = 1e-3\n'
        "[train]\nsteps = 2\nbatch_size = 4\nprogress = false\ncheckpoint_every = 1\n"
        '[text]\nrandom_encoders = "nano"\nno_reference = 0.5\n'
    )
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, udg: Path, merged: Path) -> Path:
    """`unidg train text --config C`: 2 steps with the random nano encoders saved in the run folder."""
    folder = tmp_path_factory.mktemp("text") / "run"
    config = _toml(folder.parent / "nano-text.toml", udg, merged, folder)
    assert main(["train", "text", "--config", str(config)]) == 0
    return folder


# ---------------------------------------------------------------------------------------------- the run
def test_run_writes_checkpoints_lora_and_text_record(run: Path) -> None:
    assert sorted(p.name for p in (run / CHECKPOINTS).iterdir()) == ["step-000001", "step-000002"]
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    info = json.loads((run / "lora.json").read_text())
    assert info["stage"] == "unidg-text" and info["text"]["mode"] == "instruction"
    assert info["text"]["random_encoders"] == "nano" and Path(info["text"]["encoders"]) == run / "text_encoders"
    assert info["settings"]["fold_text_tokens"] is False and info["settings"]["text_tokens"] == 16
    for name in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        assert (run / "text_encoders" / name).is_dir()


def test_resume_reaches_the_uninterrupted_state(tmp_path: Path, udg: Path, merged: Path, run: Path) -> None:
    config = _config(udg, merged, tmp_path / "resumed", encoders=None)
    # Same encoders as the uninterrupted run (random ones are made once per run folder): start from its copy.
    shutil.copytree(run / "text_encoders", tmp_path / "resumed" / "text_encoders")
    train_text(replace(config, train=replace(config.train, steps=1)))
    assert [r["step"] for r in read_log(tmp_path / "resumed")] == [1]
    train_text(config)  # resumes from step-000001
    ours, theirs = read_log(tmp_path / "resumed"), read_log(run)
    assert [r["step"] for r in ours] == [1, 2]
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    final = load_file(str(tmp_path / "resumed" / CHECKPOINTS / "step-000002" / TRAINABLE_FILE))
    reference = load_file(str(run / CHECKPOINTS / "step-000002" / TRAINABLE_FILE))
    assert set(final) == set(reference)
    assert max(float((final[k] - reference[k]).abs().max()) for k in final) < 1e-6


def _worker(rank: int, world: int, port: int, config_json: str) -> None:
    """One torchrun-like process running the real ``train_text``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    train_text(from_dict(TextSFTConfig, json.loads(config_json), "test config"))


def test_two_processes_match_one(tmp_path: Path, udg: Path, merged: Path, run: Path) -> None:
    config = _config(udg, merged, tmp_path / "two")
    shutil.copytree(run / "text_encoders", tmp_path / "two" / "text_encoders")
    # fork: the workers inherit the imported modules; rank 0 encodes the instructions, both read the features.
    mp.start_processes(
        _worker, args=(2, free_loopback_port(), json.dumps(to_dict(config))), nprocs=2, join=True, start_method="fork"
    )
    ours, theirs = read_log(tmp_path / "two"), read_log(run)
    np.testing.assert_allclose([r["loss"] for r in ours], [r["loss"] for r in theirs], rtol=0, atol=1e-5)
    final = load_file(str(tmp_path / "two" / CHECKPOINTS / "step-000002" / TRAINABLE_FILE))
    reference = load_file(str(run / CHECKPOINTS / "step-000002" / TRAINABLE_FILE))
    # AdamW divides each gradient by its own scale: float summation order over two processes moves the weights of
    # near-zero gradients by a few percent of one step (lr 1e-3), not more.
    assert max(float((final[k] - reference[k]).abs().max()) for k in final) <= 5e-5
    assert json.loads((tmp_path / "two" / "lora.json").read_text())["world_size"] == 2


def test_merge_records_the_text_mode(tmp_path: Path, merged: Path, run: Path) -> None:
    report = merge_lora(merged, run, tmp_path / "text-model")
    assert report["merge"]["max_abs_diff_vs_unmerged"] <= 1e-4
    record = text_mode(tmp_path / "text-model")
    assert record is not None and record["text_tokens"] == 16 and record["random_encoders"] == "nano"
    assert text_mode(merged) is None
    model = load_model(tmp_path / "text-model")
    assert model.settings.fold_text_tokens is False and model.settings.text_tokens == 16


# ---------------------------------------------------------------------------------------------- data
CPU = Placement(torch.device("cpu"))


def _data(config, placement: Placement = CPU):
    config = with_base_settings(config)
    model = load_model(config.base)
    model.settings = settings_of(config)
    return text_training_data(config, model, model.settings, prepare_encoders(config, placement), placement)


def test_batches_mix_both_forms_in_the_configured_ratio(tmp_path: Path, udg, merged, encoders) -> None:
    data = _data(_config(udg, merged, tmp_path / "r", encoders, no_reference=0.25))
    pools, weights = data.schedule_pools([1.0, 1.0, 1.0])
    schedule = sample_schedule(pools, weights, 6, 4, seed=0)
    no_reference = ~data.features.with_reference[schedule]
    assert no_reference.sum(axis=1).tolist() == [1] * 6  # a quarter of every batch of 4
    batch = data.batch(schedule[0])
    texts = data.features.texts
    rows = data.features.text_index[schedule[0]]
    for position, is_free in enumerate(no_reference[0]):
        assert batch["with_reference"][position] == (0.0 if is_free else 1.0)
        assert (texts[rows[position]] == REFERENCE_INSTRUCTION) != bool(is_free)
        if is_free:  # the black left half, its Redux input pixels at -1
            assert bool((batch["reference"][position] == -1.0).all())
    assert batch["text_states"].shape == (4, 16, 64) and batch["pooled"].shape == (4, 32)
    assert texts[0] == REFERENCE_INSTRUCTION and all(t.startswith("Add the ") for t in texts[1:])


def test_no_reference_example_has_a_black_left_half(udg: Path) -> None:
    samples = text_pairs(prepare_pairs(udg, seed=0), instruction_seed=0)
    free = [s for s in samples if not s.with_reference]
    assert len(free) == 8 and {s.target.id for s in free} == {s.target.id for s in samples}
    example = build_example(free[0], UniDGSettings(resolution=32), reference_size=32)
    assert not example.source[:, :32].any() and not example.result[:, :32].any()
    grid = example.defect_tokens.reshape(2, 4)
    assert not grid[:, :2].any() and grid[:, 2:].any()  # only the target region carries log alpha
    again = text_pairs(prepare_pairs(udg, seed=0), instruction_seed=0)
    assert [s.instruction for s in again] == [s.instruction for s in samples]  # reproducible


def test_text_features_are_keyed_by_encoders_and_instruction_seed(tmp_path: Path, udg, merged, encoders) -> None:
    path = tmp_path / "k" / "cache" / TEXT_FEATURES_FILE
    first = _data(_config(udg, merged, tmp_path / "k", encoders))
    written = path.stat().st_mtime_ns
    _data(_config(udg, merged, tmp_path / "k", encoders))
    assert path.stat().st_mtime_ns == written  # same key: read, not recomputed
    reseeded = _data(_config(udg, merged, tmp_path / "k", encoders, instruction_seed=5))
    assert path.stat().st_mtime_ns != written and reseeded.features.texts != first.features.texts
    before, written = reseeded.batch([0])["pooled"], path.stat().st_mtime_ns
    other = save_text_encoders(make_text_encoders("nano", seed=1), tmp_path / "other")
    swapped = _data(_config(udg, merged, tmp_path / "k", other, instruction_seed=5))
    assert path.stat().st_mtime_ns != written and swapped.features.texts == reseeded.features.texts
    assert not torch.equal(swapped.batch([0])["pooled"], before)  # new encoders, new features


def test_streamed_cache_holds_the_text_features(tmp_path: Path, udg, merged, encoders) -> None:
    config = _config(udg, merged, tmp_path / "s", encoders)
    config = replace(config, data=replace(config.data, latent_cache=str(tmp_path / "latents"), shard_size=8))
    data = _data(config)
    manifest = read_manifest(tmp_path / "latents")
    assert manifest["complete"] and manifest["key"]["settings"]["text_forms"] == TEXT_FORMS
    assert (tmp_path / "latents" / TEXT_FEATURES_FILE).is_file()
    batch = data.batch(data.no_reference_indices()[:2])
    assert batch["reference_tokens"].shape[0] == 2 and batch["with_reference"].tolist() == [0.0, 0.0]
    # Diversity-SFT reading this folder is refused by name (its samples are not SFT's pairs).
    config = with_base_settings(config)
    with pytest.raises(LatentCacheError, match=r"other settings \(text_forms 'reference\+no-reference/1' -> None\)"):
        open_cache(config, load_model(config.base), settings_of(config))


# ---------------------------------------------------------------------------------------------- bad input
def test_missing_encoders_folder_is_named(tmp_path: Path, udg, merged) -> None:
    config = _config(udg, merged, tmp_path / "e", tmp_path / "no-such-flux")
    with pytest.raises(TextEncoderError, match=r"text.encoders .*no-such-flux is not a folder; .*FLUX.1 pipeline"):
        train_text(config)


def test_base_that_is_not_merged_sft_is_refused(tmp_path: Path, udg, merged, encoders) -> None:
    base = save_model(load_model(merged), tmp_path / "base", metadata={"stage": "base"})
    with pytest.raises(ConfigError, match=r"base .*base is a 'base' weights folder.*unidg train merge"):
        train_text(_config(udg, base, tmp_path / "b", encoders))
    with pytest.raises(ConfigError, match=r"nowhere is not a folder.*unidg train merge"):
        train_text(_config(udg, tmp_path / "nowhere", tmp_path / "b", encoders))


def test_empty_caption_is_named(tmp_path: Path, udg: Path) -> None:
    pairs = prepare_pairs(udg, seed=0)
    quadruplet = read_index(udg)[0]
    blank = {"defect-level": [{"type": "", "summary": ""}], "summary": ""}
    pairs[0] = replace(pairs[0], target=replace(quadruplet, caption=blank))
    with pytest.raises(Exception, match=rf"quadruplet {quadruplet.id} has an empty caption.*fill its caption"):
        text_pairs(pairs, instruction_seed=0, folder=udg)


def test_config_needs_exactly_one_encoder_source(udg, merged, tmp_path) -> None:
    with pytest.raises(ConfigError, match="exactly one of text.encoders"):
        _config(udg, merged, tmp_path, tmp_path, random_encoders="nano")
    with pytest.raises(ConfigError, match=r"text.no_reference must be in \[0, 1\]"):
        _config(udg, merged, tmp_path, tmp_path, no_reference=1.5)


@pytest.mark.parametrize("name", ["nano-text.toml", "full-text.toml"])
def test_shipped_text_configs_are_valid(name: str) -> None:
    config = load_text_config(Path(__file__).parent.parent / "configs" / name)
    assert bool(config.text.encoders) != bool(config.text.random_encoders)
    assert settings_of(config).text_tokens in (48, 512)
