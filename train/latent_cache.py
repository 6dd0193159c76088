"""``unidg train cache``: the training tensors of every Diversity-SFT pair precomputed once into sharded safetensors
files, streamed while training with bounded memory.

At 768 px one pair's fp32 tensors are ~8 MB, so the paper's ~900K pairs cannot live in RAM. The cache folder holds
``shard-NNNNN.safetensors`` (``data.shard_size`` pairs each) and ``manifest.json``. Per pair:

  x0, masked, normal    (N, 64) bf16   latents of D_res, of the masked D_src (the Fill condition's first 64
                                        channels) and of the normal counterpart (Eq. 9)
  mask                  (S, 2S/8) uint8 the D_mask pixels, bit-packed; the condition's 256 mask channels are rebuilt
                                        from it on the fly (``unidg.train.model.pack_mask``)
  reference_tokens      (R, D) bf16    Redux tokens of the reference crop (SigLIP and Redux stay frozen in SFT)
  normal_region         (N, 4) uint8   the Eq. 9 region in latent pixels; defect_tokens, target_tokens (N,) uint8
  distribution          ()     int64

The manifest is keyed by a hash of the frozen encoders' weights (VAE, SigLIP, Redux), a hash of the data (the UDG
index, the size and modification time of every image it names, and the pair list) and the settings that shape the
tensors; a cache whose key differs is refused with a message naming what differs. Shards are written under a
temporary name and renamed, and the manifest lists each finished shard with its size and sha256, so an interrupted
``unidg train cache`` resumes where it stopped. Integrity: a shard is hashed the first time a process reads it (a
damaged one is named before its numbers reach the loss); ``unidg train cache`` rewrites every shard whose size or
header is wrong, and with ``--verify`` every shard whose sha256 is. The manifest records the sha256 of its own content;
a torn, zeroed or edited manifest, or a garbage progress file, is named by readers and rebuilt by ``unidg train
cache`` (which then rewrites the shards it can no longer vouch for).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from unidg.core.errors import UniDGError
from unidg.core.manifest import atomic_write_text, sha256_file
from unidg.core.settings import UniDGSettings
from unidg.core.udg import INDEX_FILE, read_index
from unidg.train.config import settings_of
from unidg.train.dataset import build_example, latent_region, normal_region_pixels, pair_key, to_model_pixels
from unidg.train.loading import load_model
from unidg.train.model import pack_latents, pack_mask
from unidg.train.pairs import DISTRIBUTIONS, prepare_pairs, select_pairs
from unidg.train.trainer import barrier, current_placement, distributed

FORMAT = "unidg-latent-cache"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS_PREFIX = ".progress-rank-"  # one per caching process: the shards it finished (merged into the manifest)
PACKED_FIELDS = ("x0", "masked", "normal")


class LatentCacheError(UniDGError):
    """A latent cache is missing, stale (other weights, data or settings) or damaged."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------------------------------------- the key
SKIPPED_WEIGHT_FILES = ("manifest.json", "unidg.json")  # settings are keyed on their own


def weights_digest(base: str | Path) -> str:
    """Hash of the files the cache is computed from: every file of the base weights folder except the transformer's
    (VAE, SigLIP, Redux and their configs), whatever dtype they are loaded in."""
    base = Path(base)
    if not base.is_dir():
        raise LatentCacheError(f"base {base} is not a weights folder; the latent cache is keyed by its files")
    digest = hashlib.sha256()
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        relative = path.relative_to(base).as_posix()
        if relative.startswith("transformer/") or relative in SKIPPED_WEIGHT_FILES:
            continue
        digest.update(relative.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def data_digest(config) -> str:
    """Hash of what the pair list is drawn from: the UDG index's bytes, the size and modification time of every image
    it names (no image is decoded), and the seed, limit and mix that select the pairs. Checking a cache therefore
    never recomputes the pairs (whose Alg. 2 statistics read every image)."""
    folder = Path(config.data.train)
    digest = hashlib.sha256((folder / INDEX_FILE).read_bytes())
    quadruplets = read_index(folder, check_files=False)
    if config.data.limit:
        quadruplets = quadruplets[: config.data.limit]
    for quadruplet in quadruplets:
        for which in ("normal", "abnormal", "mask"):
            path = quadruplet.path(which)
            try:
                stat = path.stat()
            except FileNotFoundError:
                raise LatentCacheError(f"{path}, named by {folder / INDEX_FILE}, does not exist") from None
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    selection = {"seed": config.seed, "limit": config.data.limit, "mix": list(config.train.mix)}
    digest.update(json.dumps(selection, sort_keys=True).encode())
    return digest.hexdigest()


def cache_settings(model, settings: UniDGSettings, with_normal: bool) -> dict:
    return {
        "resolution": settings.resolution,
        "beta": settings.beta,
        "threshold": settings.threshold,
        "dilate": [settings.dilate_kernel, settings.dilate_iterations],
        "reference_size": model.reference_size,
        "reference_tokens": model.reference_tokens,
        "normal": with_normal,
        "eq9_region": "mask-and-defect-latent",
    }


def cache_key(config, model, settings: UniDGSettings) -> dict:
    """The key of an SFT config's cache: weights, data and settings."""
    return {
        "weights": weights_digest(config.base),
        "data": data_digest(config),
        "settings": cache_settings(model, settings, config.loss.normal_reg_weight > 0),
    }


def key_differences(found: dict, wanted: dict) -> list[str]:
    """What differs between a cache's key and this run's, in words."""
    problems = []
    if found.get("weights") != wanted["weights"]:
        problems.append("other weights (the VAE, SigLIP or Redux weights changed)")
    if found.get("data") != wanted["data"]:
        problems.append("other data (the UDG index, an image file, or the seed, limit or mix of the pairs changed)")
    old, new = found.get("settings", {}), wanted["settings"]
    changed = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if changed:
        problems.append("other settings (" + ", ".join(changed) + ")")
    return problems


# ---------------------------------------------------------------------------------------------- shards
MANIFEST_FIELDS = {  # what every reader relies on, with its JSON type
    "key": dict,
    "resolution": int,
    "shard_size": int,
    "pairs": int,
    "keys": list,
    "distribution": list,
    "shards": dict,
    "complete": bool,
}
DIGEST = "sha256"  # of the manifest's canonical JSON without this field


def manifest_digest(document: dict) -> str:
    content = {name: value for name, value in document.items() if name != DIGEST}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, document: dict) -> None:
    atomic_write_text(folder / MANIFEST, json.dumps({**document, DIGEST: manifest_digest(document)}) + "\n")


class DamagedManifest(LatentCacheError):
    """The manifest cannot be trusted (torn, zeroed, edited, fields missing); ``unidg train cache`` rebuilds it."""


def read_manifest(folder: Path) -> dict | None:
    """The cache's manifest; None when there is none. Raises DamagedManifest for one that cannot be trusted."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LatentCacheError(f"latent cache {folder} is not a folder; point data.latent_cache at a folder")
    path = folder / MANIFEST
    if not path.exists():
        return None

    def damaged(why: str) -> DamagedManifest:
        return DamagedManifest(
            f"latent cache {path} is damaged ({why}); run `unidg train cache --config C` again: it rebuilds the "
            "manifest and rewrites the shards it cannot vouch for"
        )

    if not path.is_file():
        raise damaged("not a file")
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise damaged(f"not UTF-8 JSON: {error}") from None
    if not isinstance(document, dict):
        raise damaged(f"a JSON {type(document).__name__}, not an object")
    if document.get("format") != FORMAT or document.get("version") != VERSION:
        raise LatentCacheError(
            f"{path} is not a version-{VERSION} {FORMAT} manifest; rebuild it with `unidg train cache` into an empty "
            "folder"
        )
    wrong = [name for name, kind in MANIFEST_FIELDS.items() if not isinstance(document.get(name), kind)]
    if wrong:
        raise damaged(f"fields {wrong} missing or of the wrong type")
    recorded = document.get(DIGEST)
    if recorded is not None and recorded != manifest_digest(document):  # manifests of older releases have none
        raise damaged("its content does not match its recorded sha256")
    return document


def shard_path(folder: Path, name: str) -> Path:
    """A shard's path, refused when something other than a file sits there (it is not ours to remove)."""
    path = folder / name
    if path.exists() and not path.is_file():
        raise LatentCacheError(
            f"latent cache shard {path} is not a file; move it away, then run `unidg train cache --config C` again"
        )
    return path


def write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one shard (temporary name, then rename); returns its manifest entry (pairs, bytes, sha256)."""
    name = shard_name(index)
    target = shard_path(folder, name)
    tmp = folder / f".{name}.tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    digest = sha256_file(tmp)
    tmp.replace(target)
    pairs = int(next(iter(tensors.values())).shape[0])
    return {"pairs": pairs, "bytes": target.stat().st_size, "sha256": digest}


@torch.no_grad()
def shard_tensors(model, pairs, settings: UniDGSettings, with_normal: bool, batch_size: int = 8) -> dict:
    """The cached tensors of ``pairs`` (one shard), computed on the model's device."""
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    images: dict = {}
    device = model.device
    for start in range(0, len(pairs), batch_size):
        examples = [build_example(p, settings, model.reference_size, images) for p in pairs[start : start + batch_size]]

        masks = np.stack([e.mask for e in examples])
        source = to_model_pixels(np.stack([e.source for e in examples])).to(device)
        masked = source * (1 - torch.from_numpy(masks).to(device, source.dtype)[:, None])
        parts["masked"].append(pack_latents(model.encode_images(masked)).to(torch.bfloat16).cpu())
        parts["mask"].append(torch.from_numpy(np.packbits(masks, axis=-1)))
        parts["x0"].append(_latents(model, np.stack([e.result for e in examples])))
        if with_normal:
            parts["normal"].append(_latents(model, np.stack([e.normal for e in examples])))
            region = [latent_region(normal_region_pixels(e), model.vae_scale_factor) for e in examples]
            parts["normal_region"].append(torch.from_numpy(np.stack(region).astype(np.uint8)))
        reference = torch.from_numpy(np.stack([e.reference for e in examples])).permute(0, 3, 1, 2)
        tokens = model.encode_reference(reference.float().to(device) / 127.5 - 1.0)
        parts["reference_tokens"].append(tokens.to(torch.bfloat16).cpu())
        parts["defect_tokens"].append(torch.from_numpy(np.stack([e.defect_tokens for e in examples]).astype(np.uint8)))
        parts["target_tokens"].append(torch.from_numpy(np.stack([e.target_tokens for e in examples]).astype(np.uint8)))
        parts["distribution"].append(torch.tensor([DISTRIBUTIONS.index(e.distribution) for e in examples]))
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def _latents(model, images: np.ndarray) -> torch.Tensor:
    pixels = to_model_pixels(images).to(model.device)
    return pack_latents(model.encode_images(pixels)).to(torch.bfloat16).cpu()


def build_cache(
    folder: str | Path,
    model,
    pairs,
    settings: UniDGSettings,
    with_normal: bool,
    shard_size: int = 256,
    progress: bool = True,
    key: dict | None = None,
    placement=None,
    verify: bool = False,
) -> dict:
    """Write (or finish) the cache of ``pairs`` in ``folder``; returns the manifest. A folder holding a cache with
    another key is refused; finished shards of the same key are kept.

    Under torchrun each process writes the shards whose index is its rank modulo the world size and records them in
    its own progress file; rank 0 merges those into the manifest at the end (and on a later resume, at any world
    size). A damaged manifest is replaced (its shards are rewritten); ``verify`` re-hashes every finished shard and
    rewrites those whose sha256 differs."""
    placement = placement or current_placement()
    folder = Path(folder)
    if not pairs:
        raise LatentCacheError("no training pairs: the UDG folder yielded none for the selected distributions")
    if key is None:
        raise ValueError("build_cache needs the cache key (cache_key(config, model, settings))")
    try:
        manifest = read_manifest(folder)
    except DamagedManifest as error:
        print(f"unidg train cache: {error}; rebuilding it", flush=True)
        manifest = None
        barrier(placement)  # every process has read the damaged manifest before it is replaced
        if placement.is_main:
            for stale in folder.glob(f"{PROGRESS_PREFIX}*.json"):  # their run cannot be checked any more
                stale.unlink()
    if manifest is not None:
        _refuse_other_key(folder, manifest, key, shard_size)
    else:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "key": key,
            "resolution": settings.resolution,
            "shard_size": shard_size,
            "pairs": len(pairs),
            "keys": [pair_key(pair) for pair in pairs],
            "distribution": [pair.distribution for pair in pairs],
            "shards": {},
            "complete": False,
        }
    if placement.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        manifest["shards"] = _finished_shards(folder, manifest, verify)
        write_manifest(folder, manifest)
    barrier(placement)
    manifest = read_manifest(folder)
    done = manifest["shards"]
    mine = [i for i in range(-(-len(pairs) // shard_size)) if i % placement.world_size == placement.rank]
    todo = [i for i in mine if shard_name(i) not in done]
    written: dict[str, dict] = {}
    progress_file = folder / f"{PROGRESS_PREFIX}{placement.rank}.json"
    bar = tqdm(
        total=len(pairs),
        initial=sum(entry["pairs"] for entry in done.values()),
        desc="caching latents",
        unit="pair",
        disable=not (progress and placement.is_main),
    )
    for index in todo:
        chunk = pairs[index * shard_size : (index + 1) * shard_size]
        written[shard_name(index)] = write_shard(folder, index, shard_tensors(model, chunk, settings, with_normal))
        atomic_write_text(progress_file, json.dumps(written) + "\n")
        bar.update(len(chunk) * placement.world_size)  # the others advance alike
    bar.close()
    barrier(placement)
    if placement.is_main:
        manifest["shards"] = _finished_shards(folder, manifest, verify=False)  # those of this run were just hashed
        expected = {shard_name(i) for i in range(-(-len(pairs) // shard_size))}
        manifest["complete"] = expected <= set(manifest["shards"])
        write_manifest(folder, manifest)
        for leftover in folder.glob(f"{PROGRESS_PREFIX}*.json"):
            leftover.unlink()
    barrier(placement)
    return read_manifest(folder)


def _finished_shards(folder: Path, manifest: dict, verify: bool) -> dict:
    """The manifest's shards plus those recorded in the processes' progress files, kept where the file is intact
    (size and header; with ``verify`` also its sha256). A progress file that does not read is ignored: its shards are
    written again."""
    entries = dict(manifest["shards"])
    for path in sorted(folder.glob(f"{PROGRESS_PREFIX}*.json")):
        try:
            recorded = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            recorded = None
        if not isinstance(recorded, dict):
            print(f"unidg train cache: ignoring the unreadable progress file {path}", flush=True)
            continue
        entries.update(recorded)
    return {name: entry for name, entry in sorted(entries.items()) if _shard_intact(folder, name, entry, verify)}


def _refuse_other_key(folder: Path, manifest: dict, key: dict, shard_size: int) -> None:
    differences = key_differences(manifest["key"], key)
    if differences or manifest.get("shard_size") != shard_size:
        why = "; ".join(differences) or f"shard_size {manifest.get('shard_size')} -> {shard_size}"
        raise LatentCacheError(
            f"latent cache {folder} was made from {why}; point data.latent_cache at a new folder or delete "
            f"{folder} to rebuild it"
        )


def _shard_intact(folder: Path, name: str, entry: object, verify: bool = False) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int):
        return False
    path = shard_path(folder, name)
    if not path.is_file() or path.stat().st_size != entry["bytes"]:
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:  # a zero-filled or overwritten header does not read
            handle.keys()
    except Exception:  # safetensors raises its own error type for a damaged header
        return False
    return not verify or entry.get("sha256") in (None, sha256_file(path))


# ---------------------------------------------------------------------------------------------- streaming
class StreamedLatents:
    """A finished cache read a batch at a time: only the rows of the requested pairs are read (shards are opened
    for the batch and closed after it), so memory stays bounded whatever the cache's size. Same interface as
    ``unidg.train.dataset.LatentPairs``; batches carry Redux tokens instead of reference pixels."""

    def __init__(self, folder: str | Path, manifest: dict | None = None) -> None:
        self.folder = Path(folder)
        manifest = manifest or read_manifest(self.folder)
        if manifest is None:
            raise LatentCacheError(f"{self.folder} holds no latent cache; make it with `unidg train cache --config C`")
        if not manifest.get("complete"):
            raise LatentCacheError(
                f"latent cache {self.folder} is unfinished ({len(manifest['shards'])} shards written); run "
                "`unidg train cache --config C` again to finish it"
            )
        self.manifest = manifest
        self._hashed: set[str] = set()  # shards whose sha256 this process has checked
        self.keys = list(manifest["keys"])
        self.resolution = int(manifest["resolution"])
        self.shard_size = int(manifest["shard_size"])
        self.distribution = np.array([DISTRIBUTIONS.index(name) for name in manifest["distribution"]], np.int64)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def has_normal(self) -> bool:
        return bool(self.manifest["key"]["settings"]["normal"])

    def indices_of(self, distribution: str) -> np.ndarray:
        return np.flatnonzero(self.distribution == DISTRIBUTIONS.index(distribution))

    def _open(self, index: int):
        name = shard_name(index)
        path = self.folder / name
        entry = self.manifest["shards"].get(name)
        size = path.stat().st_size if path.is_file() else 0
        if entry is None or size != entry["bytes"]:
            expected = "missing from the manifest" if entry is None else f"{entry['bytes']} bytes expected"
            raise LatentCacheError(
                f"latent cache shard {path} is truncated or missing ({size} bytes on disk, {expected}); run "
                "`unidg train cache --config C` again to rewrite it"
            )
        if name not in self._hashed and entry.get("sha256") is not None:
            # Once per shard and process: a shard overwritten with its header intact must not reach the loss.
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise LatentCacheError(
                    f"latent cache shard {path} does not match its sha256 ({actual[:12]}… != {entry['sha256'][:12]}…); "
                    "run `unidg train cache --config C --verify` to rewrite the damaged shards"
                )
            self._hashed.add(name)
        try:
            return safe_open(str(path), framework="pt")
        except Exception as error:  # safetensors raises its own error type for a damaged header
            raise LatentCacheError(
                f"latent cache shard {path} cannot be read ({error}); delete it and run `unidg train cache` again"
            ) from error

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        indices = [int(i) for i in indices]
        by_shard: dict[int, list[int]] = defaultdict(list)
        for position, index in enumerate(indices):
            by_shard[index // self.shard_size].append(position)
        rows: dict[str, list] = defaultdict(lambda: [None] * len(indices))
        for shard, positions in by_shard.items():
            with self._open(shard) as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    for position in positions:
                        row = indices[position] - shard * self.shard_size
                        rows[name][position] = view[row : row + 1]
        tensors = {name: torch.cat(parts) for name, parts in rows.items()}
        mask = torch.from_numpy(np.unpackbits(tensors.pop("mask").numpy(), axis=-1).astype(np.float32))
        out = {
            "x0": tensors["x0"].float(),
            "cond": torch.cat([tensors.pop("masked").float(), pack_mask(mask)], dim=-1),
            "reference_tokens": tensors["reference_tokens"].float(),
            "defect_tokens": tensors["defect_tokens"].bool(),
            "target_tokens": tensors["target_tokens"].bool(),
            "distribution": tensors["distribution"],
        }
        if "normal" in tensors:
            out["normal"] = tensors["normal"].float()
            out["normal_region"] = tensors["normal_region"].bool()
        return out


def open_cache(config, model, settings: UniDGSettings) -> StreamedLatents:
    """The cache of an SFT config, refused unless it was made from these weights, data and settings."""
    folder = Path(config.data.latent_cache)
    manifest = read_manifest(folder)
    if manifest is None:
        raise LatentCacheError(
            f"data.latent_cache {folder} holds no latent cache; make it first with `unidg train cache --config C`"
        )
    wanted = cache_key(config, model, settings)
    differences = key_differences(manifest["key"], wanted)
    if differences:
        raise LatentCacheError(
            f"latent cache {folder} was made from {'; '.join(differences)}; rebuild it with "
            "`unidg train cache --config C` into a new data.latent_cache folder (or delete this one)"
        )
    return StreamedLatents(folder, manifest)


# Errors of the cache's file system a user fixes; the shards finished so far stay and a rerun resumes.
WRITE_FAILURES = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exhausted",
}


def cache_for_config(config, progress: bool = True, verify: bool = False) -> dict:
    """``unidg train cache``: build (or finish) the latent cache of an SFT config (under torchrun: the shards
    split over the processes). ``verify`` (``--verify``): re-hash the finished shards and rewrite damaged ones."""
    if not config.data.latent_cache:
        raise LatentCacheError("set data.latent_cache (a folder) in the config to build a latent cache")
    folder = Path(config.data.latent_cache)
    if folder.exists() and not folder.is_dir():
        raise LatentCacheError(f"latent cache {folder} is not a folder; point data.latent_cache at a folder")
    try:
        with distributed(config.train.device) as placement:
            return _cache_for_config(config, placement, progress, verify)
    except OSError as error:
        if error.errno not in WRITE_FAILURES:
            raise
        raise LatentCacheError(
            f"cannot write the latent cache into {folder}: {WRITE_FAILURES[error.errno]} ({error.filename or error}); "
            "fix that (or point data.latent_cache elsewhere) and run the same command again: finished shards are kept"
        ) from error


def _cache_for_config(config, placement, progress: bool, verify: bool) -> dict:
    device = placement.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    settings = settings_of(config)
    model = load_model(config.base, dtype=dtype, device=device)
    model.settings = settings
    key = cache_key(config, model, settings)
    try:
        manifest = read_manifest(Path(config.data.latent_cache))
    except DamagedManifest:
        manifest = None  # build_cache says so and rebuilds it
    if manifest is not None:  # refuse a stale cache before drawing the pairs (which reads every image)
        _refuse_other_key(Path(config.data.latent_cache), manifest, key, config.data.shard_size)
    pairs = select_pairs(prepare_pairs(config.data.train, config.seed, config.data.limit), config.train.mix)
    with_normal = config.loss.normal_reg_weight > 0
    return build_cache(
        config.data.latent_cache,
        model,
        pairs,
        settings,
        with_normal,
        config.data.shard_size,
        progress=progress,
        key=key,
        placement=placement,
        verify=verify,
    )


def rss_bytes() -> int:
    """Resident set size of this process."""
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss
