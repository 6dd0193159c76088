"""Calibration sets: step-model inputs captured along real 28-step trajectories of a weights folder.

``unidg calib build --data UDG --weights MERGED --out CALIB --samples N --steps 28 [--step-subset ...] --seed S``

Each sample is a synthesis request made from the UDG folder (reference = an abnormal image and its mask; source and
target region = the normal image and mask of the same quadruplet, or of another one for every second sample). It
becomes a diptych by the runtime geometry (Alg. 1) and runs through the torch reference sampler (unidg.train.sampler:
the runtime's noise recipe, schedule, key bias and Pillow resize), and the step graph's input x is recorded at the
chosen steps: the calibration inputs are those the step graph sees in production.

Folder layout (no pickle anywhere):

    CALIB/manifest.json              kind="calib", tied to the weights fingerprint
    CALIB/shard-00000.safetensors    one shard per ``samples_per_shard`` samples:
        cond [k, N, 320], ctx [k, C, J], key_bias [k, C+N], guidance [k], noise [k, N, 64]   (per sample)
        x [k, T, N, 64]   the step input x at each captured step (T = len(steps captured))
        sigma [T], sigma_next [T], steps [T] (int64), samples [k] (int64 sample index), img_ids [N, 3], txt_ids [C, 3]

The last ``held_out`` samples are not used for calibration: ``unidg export quantize`` measures the accuracy of the
quantized bundle on them. Everything is deterministic for a seed (sample choice, pairing, noise seeds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from unidg.core.errors import UniDGError
from unidg.core.manifest import Manifest, ManifestError, read_manifest, tool_versions, verify_files, write_manifest
from unidg.core.settings import UniDGSettings
from unidg.core.udg import read_index
from unidg.core.weights_folder import Progress, check_output, read_weights, staged_folder
from unidg.runtime.sampler import sampling_sigmas
from unidg.train.loading import load_weights_model
from unidg.train.sampler import denoise, get_noise, prepare_diptych

CALIB_KIND = "calib"
CALIB_FORMAT = "unidg-calib"
CALIB_FORMAT_VERSION = 1
SAMPLE_TENSORS = ("cond", "ctx", "key_bias", "guidance", "noise")


class CalibError(UniDGError):
    """A calibration set cannot be built or used as asked; the message names the input and the fix."""


# ------------------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class CalibSample:
    index: int
    reference_id: str
    source_id: str
    seed: int


def choose_samples(ids: Sequence[str], count: int, seed: int) -> list[CalibSample]:
    """Deterministic sample plan: a seeded permutation of the quadruplets; odd samples take another quadruplet's
    normal image and mask as the source (cross pairs), even ones their own (defect fill)."""
    if not ids:
        raise CalibError("the UDG folder has no quadruplets; pass a folder written by `unidg data synth`")
    rng = np.random.default_rng(seed)
    order = [ids[i] for i in rng.permutation(len(ids))]
    noise_seeds = rng.integers(0, 2**62, size=count)
    plan = []
    for i in range(count):
        reference = order[i % len(order)]
        source = order[(i + 1) % len(order)] if (i % 2 and len(order) > 1) else reference
        plan.append(CalibSample(index=i, reference_id=reference, source_id=source, seed=int(noise_seeds[i])))
    return plan


def parse_step_subset(text: str | None, steps: int) -> list[int]:
    """``"0,5,10-12"`` or ``"every:4"`` -> sorted 0-based step indices; None/"all" -> every step."""
    if text in (None, "", "all"):
        return list(range(steps))
    chosen: set[int] = set()
    if text.startswith("every:"):
        try:
            stride = int(text.split(":", 1)[1])
        except ValueError:
            raise CalibError(f"--step-subset {text!r}: 'every:K' needs an integer K, e.g. every:4") from None
        if stride < 1:
            raise CalibError(f"--step-subset {text!r}: the stride must be >= 1")
        chosen = set(range(0, steps, stride)) | {steps - 1}
    else:
        for part in text.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    lo, hi = (int(p) for p in part.split("-", 1))
                    chosen.update(range(lo, hi + 1))
                else:
                    chosen.add(int(part))
            except ValueError:
                raise CalibError(
                    f"--step-subset {text!r}: use step indices like '0,7,14,21,27', ranges '0-3' or 'every:4'"
                ) from None
    bad = sorted(i for i in chosen if not 0 <= i < steps)
    if bad:
        raise CalibError(f"--step-subset {text!r}: steps {bad} are outside 0..{steps - 1} (--steps {steps})")
    return sorted(chosen)


# ------------------------------------------------------------------------------------------------ building
@dataclass
class CalibSet:
    """A checked calibration set on disk."""

    path: Path
    manifest: Manifest
    metadata: dict = field(default_factory=dict)

    @property
    def weights_fingerprint(self) -> str:
        return str(self.metadata["weights"]["fingerprint"])

    @property
    def resolution(self) -> int:
        return int(self.metadata["resolution"])

    @property
    def held_out(self) -> list[int]:
        return [int(i) for i in self.metadata["held_out"]]

    def shards(self) -> list[Path]:
        return [self.path / shard["file"] for shard in self.metadata["shards"]]

    def iter_shards(self) -> Iterator[dict[str, np.ndarray]]:
        from safetensors.numpy import load_file

        for path in self.shards():
            yield load_file(str(path))

    def records(self, *, held_out: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Step inputs one record at a time ([1, ...] arrays named as the step graph's inputs).

        ``held_out=False``: calibration samples only; True: the held-out samples only.
        """
        keep = set(self.held_out)
        for shard in self.iter_shards():
            for row, sample in enumerate(shard["samples"]):
                if (int(sample) in keep) != held_out:
                    continue
                for t in range(len(shard["steps"])):
                    yield {
                        "x": shard["x"][row, t][None],
                        "cond": shard["cond"][row][None],
                        "ctx": shard["ctx"][row][None],
                        "key_bias": shard["key_bias"][row][None],
                        "sigma": shard["sigma"][t : t + 1],
                        "sigma_next": shard["sigma_next"][t : t + 1],
                        "guidance": shard["guidance"][row : row + 1],
                        "img_ids": shard["img_ids"],
                        "txt_ids": shard["txt_ids"],
                    }

    def samples(self, *, held_out: bool = True) -> Iterator[dict[str, np.ndarray]]:
        """Per-sample start (noise + conditioning, [1, ...] arrays) of the held-out (or the calibration) samples."""
        keep = set(self.held_out)
        for shard in self.iter_shards():
            for row, sample in enumerate(shard["samples"]):
                if (int(sample) in keep) != held_out:
                    continue
                item = {name: shard[name][row][None] for name in SAMPLE_TENSORS if name != "guidance"}
                item["guidance"] = shard["guidance"][row : row + 1]
                item["img_ids"], item["txt_ids"] = shard["img_ids"], shard["txt_ids"]
                item["sample"] = int(sample)
                yield item


def read_calib(folder: str | Path, *, verify: bool = True, weights_fingerprint: str | None = None) -> CalibSet:
    """Check a calibration folder; with ``weights_fingerprint``, refuse one made from other weights."""
    folder = Path(folder)
    try:
        manifest = read_manifest(folder, kind=CALIB_KIND)
    except ManifestError as error:
        raise CalibError(f"--calib {folder}: {error}; build one with `unidg calib build`") from error
    meta = manifest.metadata
    if meta.get("format") != CALIB_FORMAT or meta.get("format_version") != CALIB_FORMAT_VERSION:
        raise CalibError(
            f"--calib {folder}: format {meta.get('format')!r} v{meta.get('format_version')!r} is not "
            f"{CALIB_FORMAT} v{CALIB_FORMAT_VERSION}; rebuild it with `unidg calib build`"
        )
    if verify:
        try:
            verify_files(folder, manifest)
        except ManifestError as error:
            raise CalibError(f"--calib {folder}: {error}") from error
    calib = CalibSet(path=folder, manifest=manifest, metadata=meta)
    if weights_fingerprint is not None and calib.weights_fingerprint != weights_fingerprint:
        raise CalibError(
            f"--calib {folder} was captured from weights {meta['weights'].get('path')!r} (fingerprint "
            f"{calib.weights_fingerprint[:12]}…), not from these weights ({weights_fingerprint[:12]}…); "
            "calibration scales only fit the weights they were measured on: rebuild it with "
            "`unidg calib build --weights` on these weights"
        )
    return calib


def _shard_tensors(rows: list[dict], steps: list[int]) -> dict[str, np.ndarray]:
    first = rows[0]
    return {
        "cond": np.stack([r["cond"] for r in rows]),
        "ctx": np.stack([r["ctx"] for r in rows]),
        "key_bias": np.stack([r["key_bias"] for r in rows]),
        "guidance": np.asarray([r["guidance"] for r in rows], dtype=np.float32),
        "noise": np.stack([r["noise"] for r in rows]),
        "x": np.stack([r["x"] for r in rows]),
        "sigma": first["sigma"],
        "sigma_next": first["sigma_next"],
        "steps": np.asarray(steps, dtype=np.int64),
        "samples": np.asarray([r["sample"] for r in rows], dtype=np.int64),
        "img_ids": first["img_ids"],
        "txt_ids": first["txt_ids"],
    }


def build_calib(
    data: str | Path,
    weights: str | Path,
    out: str | Path,
    *,
    samples: int = 32,
    steps: int = 28,
    step_subset: str | None = None,
    seed: int = 0,
    held_out: int | None = None,
    resolution: int | None = None,
    samples_per_shard: int = 8,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Manifest:
    """``unidg calib build``: capture step inputs of ``samples`` requests along their ``steps``-step trajectories."""
    from safetensors.numpy import save_file

    if samples < 2:
        raise CalibError(f"--samples {samples}: need at least 2 (calibration samples plus held-out ones)")
    if steps < 1:
        raise CalibError(f"--steps {steps}: must be >= 1")
    held_out = max(1, samples // 4) if held_out is None else held_out
    if not 1 <= held_out < samples:
        raise CalibError(f"--held-out {held_out}: need 1 <= held-out < --samples ({samples})")
    capture = parse_step_subset(step_subset, steps)
    check_output(out, overwrite=overwrite)  # refused before the weights are read and the trajectories run
    info = read_weights(weights, progress=progress)
    size = info.settings.resolution if resolution is None else int(resolution)
    if size < 16 or size % 16:
        raise CalibError(f"--resolution {size} is not a positive multiple of 16")
    settings = UniDGSettings.from_dict({**info.settings.to_dict(), "resolution": size})
    quadruplets = {q.id: q for q in read_index(data)}
    plan = choose_samples(sorted(quadruplets), samples, seed)

    model = load_weights_model(info, settings)
    image_tokens = settings.image_tokens
    sigmas = sampling_sigmas(steps, image_tokens)

    shards: list[dict] = []
    with staged_folder(out, overwrite=overwrite) as staging:
        rows: list[dict] = []
        for sample in plan:
            reference = quadruplets[sample.reference_id]
            source = quadruplets[sample.source_id]
            diptych = settings.diptych(
                reference.load_abnormal(), reference.load_mask(), source.load_normal(), source.load_mask(), size
            )
            inputs = prepare_diptych(model, diptych)
            noise = get_noise([sample.seed], image_tokens)
            x, captured = noise, []
            for i in range(capture[-1] + 1):  # nothing after the last captured step is needed
                if i in capture:
                    captured.append(x[0].numpy().copy())
                x = denoise(model, x, inputs, [float(sigmas[i]), float(sigmas[i + 1])], settings.guidance)
            rows.append(
                {
                    "sample": sample.index,
                    "cond": inputs.cond[0].numpy(),
                    "ctx": inputs.ctx[0].numpy(),
                    "key_bias": inputs.key_bias[0].numpy(),
                    "guidance": settings.guidance,
                    "noise": noise[0].numpy(),
                    "x": np.stack(captured),
                    "sigma": sigmas[capture].astype(np.float32),
                    "sigma_next": sigmas[[i + 1 for i in capture]].astype(np.float32),
                    "img_ids": inputs.img_ids.numpy(),
                    "txt_ids": inputs.txt_ids.numpy(),
                }
            )
            if progress:
                progress(f"sample {sample.index + 1}/{samples}: {len(captured)} step inputs captured")
            if len(rows) == samples_per_shard or sample is plan[-1]:
                name = f"shard-{len(shards):05d}.safetensors"
                tensors = _shard_tensors(rows, capture)
                save_file(tensors, str(staging / name), metadata={"format": CALIB_FORMAT})
                shards.append({"file": name, "samples": [int(r["sample"]) for r in rows]})
                rows = []
        metadata = {
            "format": CALIB_FORMAT,
            "format_version": CALIB_FORMAT_VERSION,
            "weights": info.reference(),
            "settings": settings.to_dict(),
            "resolution": size,
            "image_tokens": image_tokens,
            "context_tokens": model.text_token_count() + model.reference_tokens,
            "joint_dim": model.joint_dim,
            "samples": samples,
            "steps": steps,
            "captured_steps": capture,
            "seed": seed,
            "held_out": [s.index for s in plan[samples - held_out :]],
            "plan": [
                {"sample": s.index, "reference": s.reference_id, "source": s.source_id, "seed": s.seed} for s in plan
            ],
            "data": {"path": Path(data).name, "quadruplets": len(quadruplets)},
            "shards": shards,
            "tools": tool_versions("unidg", "torch", "diffusers", "safetensors"),
        }
        manifest = write_manifest(staging, CALIB_KIND, metadata)
    if progress:
        progress(f"calibration set written to {out} ({samples} samples x {len(capture)} steps)")
    return manifest
