"""The sharded latent cache (`unidg train cache`): what it stores equals the in-memory latents, SFT trains from it,
streaming keeps memory flat, a cache from other weights / data / settings is refused naming what differs, and a
truncated shard is detected and rebuilt."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import SETTINGS, nano_sft_config, udg_fixture

from unidg.train.config import DataConfig, LossConfig, SFTConfig, settings_of
from unidg.train.latent_cache import (
    FORMAT,
    MANIFEST,
    VERSION,
    LatentCacheError,
    StreamedLatents,
    cache_for_config,
    open_cache,
    read_manifest,
    rss_bytes,
    shard_name,
    write_shard,
)
from unidg.train.model import UniDGModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


udg = udg_fixture(8)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from unidg.core.settings import UniDGSettings
    from unidg.train.loading import save_model

    model = UniDGModel.from_preset("nano", seed=0, settings=UniDGSettings(**SETTINGS))
    return save_model(model, tmp_path_factory.mktemp("weights") / "base")


def _config(udg: Path, base: Path, tmp: Path, **settings) -> SFTConfig:
    data = DataConfig(train=str(udg), latent_cache=str(tmp / "cache"), shard_size=5)
    loss = LossConfig(normal_reg_weight=0.5)
    return nano_sft_config(
        udg, tmp / "run", base=base, data=data, loss=loss, settings=settings, steps=2, batch_size=4, checkpoint_every=0
    )


@pytest.fixture(scope="module")
def built(udg: Path, base: Path, tmp_path_factory) -> SFTConfig:
    config = _config(udg, base, tmp_path_factory.mktemp("built"))
    cache_for_config(config, progress=False)
    return config


def _model(base: Path, config: SFTConfig):
    from unidg.train.loading import load_model

    model = load_model(base)
    model.settings = settings_of(config)
    return model


def _pairs(config: SFTConfig):
    from unidg.train.pairs import prepare_pairs, select_pairs

    return select_pairs(prepare_pairs(config.data.train, config.seed), config.train.mix)


def test_cache_matches_the_in_memory_latents_and_trains(built: SFTConfig, base: Path) -> None:
    from unidg.train.dataset import LatentPairs

    manifest = read_manifest(Path(built.data.latent_cache))
    pairs = _pairs(built)
    assert manifest["complete"] and manifest["pairs"] == len(pairs) > 5
    assert len(manifest["shards"]) == -(-len(pairs) // 5)
    model = _model(base, built)
    streamed = open_cache(built, model, model.settings)
    memory = LatentPairs.build(model, pairs, model.settings, with_normal=True)
    indices = [len(pairs) - 1, 0, 6]  # across shards, out of order
    got, want = streamed.batch(indices), memory.batch(indices)
    bf16 = {"atol": 0.05, "rtol": 0.02}  # the cache stores latents in bf16
    torch.testing.assert_close(got["x0"], want["x0"], **bf16)
    torch.testing.assert_close(got["normal"], want["normal"], **bf16)
    torch.testing.assert_close(got["cond"][..., :64], want["cond"][..., :64], **bf16)
    assert torch.equal(got["cond"][..., 64:], want["cond"][..., 64:])  # mask channels rebuilt exactly
    for name in ("normal_region", "defect_tokens", "target_tokens", "distribution"):
        assert torch.equal(got[name], want[name]), name
    with torch.no_grad():
        tokens = model.encode_reference(want["reference"])
    torch.testing.assert_close(got["reference_tokens"], tokens, **bf16)
    assert streamed.keys == memory.keys
    np.testing.assert_array_equal(streamed.indices_of("intra-object"), memory.indices_of("intra-object"))

    from unidg.train.checkpoints import read_log
    from unidg.train.sft import setup_sft

    run = setup_sft(built, model=_model(base, built))
    assert isinstance(run.trainer.data, StreamedLatents)
    run.trainer.run()
    log = read_log(built.output)
    assert len(log) == 2 and all(np.isfinite(r["loss"]) and r["normal_reg"] >= 0 for r in log)


def test_other_settings_data_or_weights_are_refused_by_name(built: SFTConfig, base: Path, udg: Path, tmp_path) -> None:
    model = _model(base, built)
    pairs = _pairs(built)
    other = dataclasses.replace(built, settings={**SETTINGS, "beta": 0.5})
    with pytest.raises(LatentCacheError, match=r"other settings \(beta 0.6 -> 0.5\).*unidg train cache"):
        open_cache(other, model, settings_of(other))
    # The cache command refuses too, and what is there stays.
    cache = Path(built.data.latent_cache)
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    with pytest.raises(LatentCacheError, match="other settings"):
        cache_for_config(other, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before

    with pytest.raises(LatentCacheError, match=r"other data \(.*seed, limit or mix"):
        open_cache(dataclasses.replace(built, seed=1), model, model.settings)
    image = pairs[0].target.path("abnormal")
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file was rewritten
    try:
        with pytest.raises(LatentCacheError, match="other data"):
            open_cache(built, model, model.settings)
    finally:
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    from safetensors.torch import load_file, save_file

    changed = tmp_path / "weights"
    import shutil

    shutil.copytree(base, changed)
    vae_file = next((changed / "vae").glob("*.safetensors"))
    tensors = load_file(str(vae_file))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3
    save_file(tensors, str(vae_file))
    moved = dataclasses.replace(built, base=str(changed))
    with pytest.raises(LatentCacheError, match=r"other weights \(the VAE, SigLIP or Redux weights changed\)"):
        open_cache(moved, model, model.settings)


def test_a_truncated_shard_is_named_and_rebuilt(built: SFTConfig, base: Path, tmp_path) -> None:
    import shutil

    folder = tmp_path / "cache"
    shutil.copytree(built.data.latent_cache, folder)
    config = dataclasses.replace(built, data=dataclasses.replace(built.data, latent_cache=str(folder)))
    shard = folder / shard_name(1)
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])
    data = StreamedLatents(folder)
    data.batch([0])  # shard 0 is fine
    with pytest.raises(LatentCacheError, match=rf"{shard_name(1)} is truncated.*run `unidg train cache --config C`"):
        data.batch([5])
    untouched = (folder / shard_name(0)).stat().st_mtime_ns
    cache_for_config(config, progress=False)  # resumes: only the damaged shard is rewritten
    assert (folder / shard_name(0)).stat().st_mtime_ns == untouched
    assert shard.read_bytes() == intact
    StreamedLatents(folder).batch([5])


def test_streaming_a_cache_larger_than_the_budget_keeps_memory_flat(tmp_path: Path) -> None:
    """A fabricated cache 4x a 24 MiB budget (S = 256: 512 tokens a pair), read batch by batch in full."""
    import json

    budget = 24 * 2**20
    pairs, shard_size, tokens, size, batch = 480, 60, 512, 256, 4
    generator = torch.Generator().manual_seed(0)
    shards = {}
    for index in range(pairs // shard_size):
        latents = {
            name: torch.randn(shard_size, tokens, 64, generator=generator).to(torch.bfloat16)
            for name in ("x0", "masked", "normal")
        }
        tensors = {
            **latents,
            "mask": torch.randint(0, 255, (shard_size, size, 2 * size // 8), dtype=torch.uint8, generator=generator),
            "reference_tokens": torch.randn(shard_size, 64, 64, generator=generator).to(torch.bfloat16),
            "normal_region": torch.ones(shard_size, tokens, 4, dtype=torch.uint8),
            "defect_tokens": torch.ones(shard_size, tokens, dtype=torch.uint8),
            "target_tokens": torch.ones(shard_size, tokens, dtype=torch.uint8),
            "distribution": torch.zeros(shard_size, dtype=torch.int64),
        }
        shards[shard_name(index)] = write_shard(tmp_path, index, tensors)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "key": {"weights": "w", "data": "d", "settings": {"normal": True}},
        "resolution": size,
        "shard_size": shard_size,
        "pairs": pairs,
        "keys": [f"defect-fill:{i}->{i}" for i in range(pairs)],
        "distribution": ["defect-fill"] * pairs,
        "shards": shards,
        "complete": True,
    }
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    total = sum(entry["bytes"] for entry in shards.values())
    assert total > 4 * budget
    data = StreamedLatents(tmp_path)
    order = np.random.default_rng(0).permutation(pairs)
    data.batch(order[:batch])  # warm-up: allocator and imports
    start = rss_bytes()
    peak = start
    for first in range(0, pairs, batch):
        tensors = data.batch(order[first : first + batch])
        assert tensors["cond"].shape == (batch, tokens, 320)
        peak = max(peak, rss_bytes())
    end = rss_bytes()
    mib = 2**20
    print(f"cache {total / mib:.0f} MiB; RSS start {start / mib:.0f} MiB, peak {peak / mib:.0f}, end {end / mib:.0f}")
    assert peak - start < budget, f"RSS grew by {(peak - start) / 2**20:.0f} MiB streaming {total / 2**20:.0f} MiB"


def _cache_worker(rank: int, world: int, port: int, config_json: str) -> None:
    """One torchrun-like caching process."""
    import json

    from unidg.train.config import from_dict

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    cache_for_config(from_dict(SFTConfig, json.loads(config_json), "test config"), progress=False)


def test_two_processes_write_the_same_cache_as_one(built: SFTConfig, tmp_path: Path) -> None:
    import json
    import socket

    import torch.multiprocessing as mp

    from unidg.train.config import to_dict

    folder = tmp_path / "cache2"
    config = dataclasses.replace(built, data=dataclasses.replace(built.data, latent_cache=str(folder)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.start_processes(
        _cache_worker, args=(2, port, json.dumps(to_dict(config))), nprocs=2, join=True, start_method="fork"
    )
    one, two = read_manifest(Path(built.data.latent_cache)), read_manifest(folder)
    assert two["complete"] and two["shards"] == one["shards"] and two["keys"] == one["keys"]
    for name in one["shards"]:
        assert (folder / name).read_bytes() == (Path(built.data.latent_cache) / name).read_bytes(), name
    assert not list(folder.glob(".progress-*"))  # merged into the manifest


# ------------------------------------------------------------------------------------------------ integrity
def _copy(built: SFTConfig, tmp_path: Path) -> tuple[Path, SFTConfig]:
    import shutil

    folder = tmp_path / "cache"
    shutil.copytree(built.data.latent_cache, folder)
    return folder, dataclasses.replace(built, data=dataclasses.replace(built.data, latent_cache=str(folder)))


def test_a_shard_overwritten_with_its_header_intact_is_named_and_rebuilt(built: SFTConfig, tmp_path) -> None:
    folder, config = _copy(built, tmp_path)
    shard = folder / shard_name(1)
    intact = shard.read_bytes()
    shard.write_bytes(intact[:-64] + bytes(64))  # same size, the same header, other numbers
    with pytest.raises(LatentCacheError, match=rf"{shard_name(1)} does not match its sha256.*train cache.*--verify"):
        StreamedLatents(folder).batch([5])
    cache_for_config(config, progress=False, verify=True)
    assert shard.read_bytes() == intact
    StreamedLatents(folder).batch([5])


def test_a_zero_filled_shard_is_rebuilt_by_train_cache(built: SFTConfig, tmp_path) -> None:
    folder, config = _copy(built, tmp_path)
    shard = folder / shard_name(0)
    intact = shard.read_bytes()
    shard.write_bytes(bytes(len(intact)))
    cache_for_config(config, progress=False)  # no --verify: a header that does not read is seen anyway
    assert shard.read_bytes() == intact


@pytest.mark.parametrize(
    "damage",
    ["torn", "zeroed", "not-utf8", "without-keys", "edited", "garbage-progress"],
)
def test_a_damaged_manifest_is_named_and_train_cache_resumes(built: SFTConfig, tmp_path, damage) -> None:
    import json

    folder, config = _copy(built, tmp_path)
    path = folder / MANIFEST
    text = path.read_bytes()
    if damage == "torn":
        path.write_bytes(text[: len(text) // 2])
    elif damage == "zeroed":
        path.write_bytes(bytes(len(text)))
    elif damage == "not-utf8":
        path.write_bytes(b"\xff" + text)
    elif damage == "without-keys":
        document = json.loads(text)
        del document["keys"]
        path.write_text(json.dumps(document))
    elif damage == "edited":
        path.write_text(json.dumps({**json.loads(text), "shard_size": 4}))
    else:
        (folder / ".progress-rank-0.json").write_bytes(b"\x00garbage{")
    if damage != "garbage-progress":
        with pytest.raises(LatentCacheError, match=r"manifest.json is damaged.*run `unidg train cache --config C`"):
            StreamedLatents(folder)
    manifest = cache_for_config(config, progress=False)
    assert manifest["complete"] and not list(folder.glob(".progress-rank-*"))
    StreamedLatents(folder).batch([0, 5])


def test_unusable_cache_folders_are_refused_by_name(built: SFTConfig, tmp_path, monkeypatch) -> None:
    folder, config = _copy(built, tmp_path)
    shard = folder / shard_name(1)
    shard.unlink()
    shard.mkdir()
    (shard / "keep.txt").write_text("someone's file")
    with pytest.raises(LatentCacheError, match=rf"{shard_name(1)} is not a file.*move it away"):
        cache_for_config(config, progress=False)
    assert (shard / "keep.txt").read_text() == "someone's file"

    a_file = tmp_path / "cache-file"
    a_file.write_text("not a folder")
    as_file = dataclasses.replace(config, data=dataclasses.replace(config.data, latent_cache=str(a_file)))
    with pytest.raises(LatentCacheError, match="is not a folder; point data.latent_cache at a folder"):
        cache_for_config(as_file, progress=False)

    import errno

    from unidg.train import latent_cache

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "fresh" / MANIFEST))

    monkeypatch.setattr(latent_cache, "atomic_write_text", refuse)
    fresh = dataclasses.replace(config, data=dataclasses.replace(config.data, latent_cache=str(tmp_path / "fresh")))
    with pytest.raises(LatentCacheError, match="cannot write the latent cache.*permission denied"):
        cache_for_config(fresh, progress=False)
