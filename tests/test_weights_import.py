"""``unidg weights import``: tiny random checkpoints in the real download layouts (diffusers pipelines saved with
``save_pretrained``, BFL single files, a Hugging Face cache snapshot, a full SigLIP model) import to a weights folder
whose model computes exactly what the source model computes; bad sources are refused by name and leave no folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers import FluxPriorReduxPipeline
from safetensors.torch import load_file, save_file
from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel
from weights_fixtures import assert_same_model, random_nano

from unidg.cli import main
from unidg.core.manifest import WeightsError, read_manifest, sha256_file, verify_files
from unidg.export.bench_runtime import stock_fill_pipeline
from unidg.train.loading import (
    BFL_REDUX_FILE,
    BFL_TRANSFORMER_FILE,
    BFL_VAE_FILE,
    bfl_transformer_state_dict,
    bfl_vae_state_dict,
    load_model,
)
from unidg.train.model import UniDGModel
from unidg.train.weights_files import Checkpoint
from unidg.train.weights_import import FILL_REPO, REDUX_REPO, ImportSources, import_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5  # equal weights, outputs equal to float rounding (see weights_fixtures.assert_same_model)
LICENSE_TEXT = "FLUX.1 [dev] Non-Commercial License (test copy)\n"
MODEL_CARD = "---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n---\n# FLUX.1 Fill [dev]\n"


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.contiguous() for key, value in state.items()}


def _hf_cache_repo(folder: Path, cache: Path, repo: str) -> Path:
    """``folder`` laid out as the hub cache stores a download: blobs named by sha256, a snapshot of symlinks."""
    root = cache / f"models--{repo.replace('/', '--')}"
    revision = hashlib.sha1(repo.encode()).hexdigest()
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        blob = root / "blobs" / sha256_file(path)
        blob.write_bytes(path.read_bytes())
        link = root / "snapshots" / revision / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


@pytest.fixture(scope="module")
def downloads(tmp_path_factory) -> dict:
    """One random nano model written in every layout a user downloads."""
    root = tmp_path_factory.mktemp("downloads")
    model = random_nano(seed=11)
    fill = root / "FLUX.1-Fill-dev"
    pipeline = stock_fill_pipeline(model)
    pipeline.save_pretrained(fill, max_shard_size="2MB")  # sharded, as the real transformer is (3 shards)
    (fill / "LICENSE.md").write_text(LICENSE_TEXT)
    (fill / "README.md").write_text(MODEL_CARD)
    redux = root / "FLUX.1-Redux-dev"
    FluxPriorReduxPipeline(
        image_encoder=model.image_encoder, feature_extractor=SiglipImageProcessor(), image_embedder=model.redux
    ).save_pretrained(redux)

    bfl = root / "bfl"
    bfl.mkdir()
    save_file(_contiguous(bfl_transformer_state_dict(model.transformer.state_dict())), bfl / BFL_TRANSFORMER_FILE)
    save_file(_contiguous(bfl_vae_state_dict(model.vae.state_dict())), bfl / BFL_VAE_FILE)
    save_file(_contiguous(model.redux.state_dict()), bfl / BFL_REDUX_FILE)
    (bfl / "LICENSE.md").write_text(LICENSE_TEXT)

    # google/siglip-so400m-patch14-384 is a full SiglipModel (text tower included): only the vision tower is taken.
    vision = model.image_encoder.config.to_dict()
    siglip = SiglipModel(
        SiglipConfig(
            text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
            vision_config=vision,
        )
    )
    siglip.vision_model.load_state_dict(model.image_encoder.state_dict())
    siglip.save_pretrained(root / "siglip-so400m")

    cache = root / "hub"
    _hf_cache_repo(fill, cache, FILL_REPO)
    _hf_cache_repo(redux, cache, REDUX_REPO)
    return {"model": model, "fill": fill, "redux": redux, "bfl": bfl, "siglip": root / "siglip-so400m", "cache": cache}


def _import(out: Path, preset: str = "nano", **sources) -> dict:
    return import_weights(out, ImportSources(**sources), preset=preset, shard_bytes=1 << 20, progress=False)


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_diffusers_pipelines_import_to_the_same_model(downloads: dict, tmp_path: Path) -> None:
    model: UniDGModel = downloads["model"]
    report = _import(tmp_path / "w", fill=str(downloads["fill"]), redux=str(downloads["redux"]))
    imported = load_model(tmp_path / "w", settings=model.settings)
    differences = assert_same_model(imported, model, atol=ATOL)  # every tensor equal, outputs to float rounding
    print(f"diffusers pipelines -> weights folder: max abs output difference {differences}")

    manifest = read_manifest(tmp_path / "w", kind="weights")
    verify_files(tmp_path / "w", manifest)
    assert manifest.metadata["stage"] == "imported" and manifest.metadata["preset"] == "nano"
    assert report["components"]["transformer"]["layout"] == "diffusers"
    assert report["parameters"] == model.parameter_count()
    # Sources: the file names and their sha256, as read from the download.
    shards = manifest.metadata["sources"]["transformer"]["files"]
    assert len(shards) > 1
    first = downloads["fill"] / "transformer" / shards[0]["name"]
    assert shards[0]["sha256"] == sha256_file(first)
    # The license travels with the weights: the file copied, the model card's license named.
    assert (tmp_path / "w" / "licenses" / "fill" / "LICENSE.md").read_text() == LICENSE_TEXT
    assert manifest.metadata["licenses"]["fill"]["license_name"] == "flux-1-dev-non-commercial-license"
    assert "licenses/fill/LICENSE.md" in manifest.files
    # Written in bounded shards, with save_pretrained's index, and read back by diffusers itself.
    index = json.loads((tmp_path / "w" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report["components"]["transformer"]["files"] > 1


def test_bfl_single_files_and_a_full_siglip_import_to_the_same_model(downloads: dict, tmp_path: Path) -> None:
    model: UniDGModel = downloads["model"]
    bfl = downloads["bfl"]
    report = _import(
        tmp_path / "w",
        fill=str(bfl / BFL_TRANSFORMER_FILE),  # ae.safetensors is found beside it
        redux=str(bfl / BFL_REDUX_FILE),
        image_encoder=str(downloads["siglip"]),
    )
    assert {name: entry["layout"] for name, entry in report["components"].items()} == {
        "transformer": "bfl",
        "vae": "bfl",
        "image_encoder": "diffusers",
        "redux": "bfl",
    }
    differences = assert_same_model(load_model(tmp_path / "w", settings=model.settings), model, atol=ATOL)
    print(f"BFL single files + SigLIP -> weights folder: max abs output difference {differences}")
    assert report["licenses"]["fill"]["files"] == ["licenses/fill/LICENSE.md"]


def test_hf_cache_and_mixed_sources_through_the_command_line(downloads: dict, tmp_path: Path, capsys) -> None:
    model: UniDGModel = downloads["model"]
    cache = downloads["cache"]
    # Only the cache: the FLUX repos are looked up in it (offline); the blobs' names are their sha256.
    argv = ["weights", "import", "--out", str(tmp_path / "w"), "--preset", "nano", "--hf-cache", str(cache)]
    assert main([*argv, "--quiet", "--shard-mb", "1"]) == 0
    printed = capsys.readouterr().out
    assert "flux-1-dev-non-commercial-license" in printed and "preset nano" in printed
    differences = assert_same_model(load_model(tmp_path / "w", settings=model.settings), model, atol=ATOL)
    with capsys.disabled():
        print(f"Hugging Face cache -> weights folder: max abs output difference {differences}")
    sources = read_manifest(tmp_path / "w").metadata["sources"]
    assert "snapshots" in sources["transformer"]["path"]
    vae_file = sources["vae"]["files"][0]
    assert vae_file["sha256"] == sha256_file(downloads["fill"] / "vae" / vae_file["name"])

    # Mixed: BFL transformer, diffusers VAE component folder, a cache repo folder for Redux, bfloat16 storage.
    report = import_weights(
        tmp_path / "mixed",
        ImportSources(
            transformer=str(downloads["bfl"] / BFL_TRANSFORMER_FILE),
            vae=str(downloads["fill"] / "vae"),
            redux=str(cache / f"models--{REDUX_REPO.replace('/', '--')}"),
        ),
        preset="nano",
        dtype=torch.bfloat16,
        progress=False,
    )
    assert report["dtype"] == "bfloat16"
    imported = load_model(tmp_path / "mixed", settings=model.settings)
    expected = {key: value.to(torch.bfloat16).float() for key, value in model.state_dict().items()}
    assert all(torch.equal(imported.state_dict()[key], value) for key, value in expected.items())
    assert main(["weights", "info", str(tmp_path / "mixed"), "--verify"]) == 0
    info = capsys.readouterr().out
    assert "stage imported" in info and "bfloat16" in info and "files checked" in info


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit(path: Path, change) -> None:
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def _bfl_copy(downloads: dict, folder: Path) -> Path:
    folder.mkdir()
    for name in (BFL_TRANSFORMER_FILE, BFL_VAE_FILE, BFL_REDUX_FILE):
        (folder / name).write_bytes((downloads["bfl"] / name).read_bytes())
    return folder


BAD_CASES = {
    "missing vae file": (lambda f: (f / BFL_VAE_FILE).unlink(), "no source for the FLUX VAE"),
    "truncated safetensors": (lambda f: _truncate(f / BFL_VAE_FILE), rf"{BFL_VAE_FILE} is not a readable .*truncated"),
    "unknown key": (
        lambda f: _edit(f / BFL_REDUX_FILE, lambda t: t.update({"vision_proj.weight": torch.zeros(2, 2)})),
        r"flux1-redux-dev.safetensors has the unknown key 'vision_proj.weight'",
    ),
    "missing key": (
        lambda f: _edit(f / BFL_TRANSFORMER_FILE, lambda t: t.pop("single_blocks.3.linear2.weight")),
        r"flux1-fill-dev.safetensors lacks 'single_blocks.3.linear2.weight' — a partial download",
    ),
    "FLUX.1-dev, not Fill": (
        lambda f: _edit(f / BFL_TRANSFORMER_FILE, lambda t: t.update({"img_in.weight": torch.zeros(128, 64)})),
        r"img_in.weight has shape \(128, 64\), preset nano needs \(128, 384\) — this is FLUX.1-dev",
    ),
    "fp8 tensor": (
        lambda f: _edit(
            f / BFL_REDUX_FILE, lambda t: t.update({"redux_up.weight": t["redux_up.weight"].to(torch.float8_e4m3fn)})
        ),
        r"redux_up.weight is F8_E4M3; a weights folder holds float32",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_sources_are_refused_by_file_and_key(downloads: dict, tmp_path: Path, case: str) -> None:
    spoil, message = BAD_CASES[case]
    folder = _bfl_copy(downloads, tmp_path / "bfl")
    spoil(folder)
    out = tmp_path / "w"
    with pytest.raises(WeightsError, match=message):
        _import(out, fill=str(folder), redux=str(folder / BFL_REDUX_FILE), image_encoder=str(downloads["siglip"]))
    _assert_nothing_left(out)


def test_refusals_of_whole_downloads(downloads: dict, tmp_path: Path, capsys) -> None:
    out = tmp_path / "w"
    # A shard of the diffusers transformer missing (an interrupted download).
    fill = tmp_path / "fill"
    fill.mkdir()
    for path in downloads["fill"].rglob("*"):
        if path.is_file():
            (fill / path.relative_to(downloads["fill"])).parent.mkdir(parents=True, exist_ok=True)
            (fill / path.relative_to(downloads["fill"])).write_bytes(path.read_bytes())
    second_shard = sorted((fill / "transformer").glob("diffusion_pytorch_model-00002-of-*.safetensors"))[0]
    second_shard.unlink()
    with pytest.raises(WeightsError, match=rf"{second_shard.name} is missing \(an incomplete download"):
        _import(out, fill=str(fill), redux=str(downloads["redux"]))
    # The nano download checked against the full preset: the first key whose shape differs is named.
    with pytest.raises(WeightsError, match=r"preset full needs"):
        _import(out, preset="full", fill=str(downloads["fill"]), redux=str(downloads["redux"]))
    # A repo the cache does not hold; a component nobody supplies.
    with pytest.raises(WeightsError, match="no snapshot of it in the Hugging Face cache"):
        _import(out, fill="black-forest-labs/FLUX.1-Kontext-dev", hf_cache=str(downloads["cache"]))
    with pytest.raises(WeightsError, match=r"SigLIP image encoder: pass --redux .* or --image-encoder"):
        _import(out, fill=str(downloads["fill"]), redux=str(downloads["bfl"] / BFL_REDUX_FILE))
    _assert_nothing_left(out)
    # On the command line: one line naming the problem, exit 2.
    assert main(["weights", "import", "--out", str(out), "--preset", "nano", "--fill", str(tmp_path / "none")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "no such file or folder" in error
    _assert_nothing_left(out)


def test_a_failure_while_writing_leaves_no_folder(downloads: dict, tmp_path: Path, monkeypatch) -> None:
    """A read error in the middle of the copy (a disk fault, a file changed under us) removes the staging folder."""
    calls = {"count": 0}
    read = Checkpoint.read

    def failing_read(self, keys):
        calls["count"] += 1
        if calls["count"] == 5:
            raise WeightsError(f"{self.label}: reading failed (simulated I/O error)")
        return read(self, keys)

    monkeypatch.setattr(Checkpoint, "read", failing_read)
    out = tmp_path / "deeper" / "w"
    with pytest.raises(WeightsError, match="simulated I/O error"):
        _import(out, fill=str(downloads["fill"]), redux=str(downloads["redux"]))
    assert calls["count"] == 5
    assert not (tmp_path / "deeper").exists()  # the parent made for it is gone too


# Peak RSS from the kernel's high-water mark (VmHWM), reset once the imports are done. Not getrusage's ru_maxrss:
# Linux keeps it across execve, so a child of a large test process starts with its parent's peak.
RSS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    from unidg.train.weights_import import ImportSources, import_weights
    from {module} import WIDE

    def status_kib(field: str) -> int:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field))
        return int(line.split()[1])

    folder, out, shard = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current RSS
    before = status_kib("VmRSS:")
    import_weights(
        out,
        ImportSources(fill=str(folder / "flux1-fill-dev.safetensors"), redux=str(folder / "FLUX.1-Redux-dev")),
        preset=WIDE,
        shard_bytes=shard,
        progress=False,
    )
    print(json.dumps({{"before": before << 10, "peak": status_kib("VmHWM:") << 10}}))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (VmHWM, clear_refs)")
def test_import_streams_a_checkpoint_larger_than_its_memory_budget(downloads: dict, tmp_path: Path) -> None:
    """A ~210 MB BFL transformer imports in a fresh process whose RSS grows by far less than the checkpoint."""
    from weights_fixtures import WIDE

    model = UniDGModel.from_preset(WIDE, device="meta")
    generator = torch.Generator().manual_seed(0)
    state = {
        key: torch.randn(tuple(value.shape), generator=generator)
        for key, value in bfl_transformer_state_dict(model.transformer.state_dict()).items()
    }
    save_file(state, str(tmp_path / BFL_TRANSFORMER_FILE))
    del state
    (tmp_path / BFL_VAE_FILE).write_bytes((downloads["bfl"] / BFL_VAE_FILE).read_bytes())
    (tmp_path / "FLUX.1-Redux-dev").symlink_to(downloads["redux"])
    checkpoint_bytes = (tmp_path / BFL_TRANSFORMER_FILE).stat().st_size
    assert checkpoint_bytes > 200e6

    budget = checkpoint_bytes // 2
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT.format(module="weights_fixtures"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    shard = 16 << 20
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tmp_path / "w"), str(shard)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    growth = figures["peak"] - figures["before"]
    print(
        f"import of a {checkpoint_bytes / 2**20:.0f} MiB checkpoint (16 MiB shards): RSS "
        f"{figures['before'] / 2**20:.0f} MiB before, peak {figures['peak'] / 2**20:.0f} MiB, "
        f"growth {growth / 2**20:.0f} MiB (budget {budget / 2**20:.0f} MiB)"
    )
    assert growth < budget
    assert sum(p.stat().st_size for p in (tmp_path / "w" / "transformer").glob("*.safetensors")) == pytest.approx(
        checkpoint_bytes, rel=0.01
    )
