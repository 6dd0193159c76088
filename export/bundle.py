"""Write a bundle folder (Bundle format v1): the four ONNX graphs and ``manifest.json`` kind="bundle".

A bundle is written into a temporary folder beside ``OUT`` and renamed into place at the end, so a failed or
interrupted export leaves nothing half-written. The manifest ties the bundle to its weights folder (the weights
manifest's fingerprint) and records shapes, dtypes, opset, the UniDG settings and the tool versions; the runtime
(``unidg.runtime.bundle.load_bundle``) checks all of it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from unidg.export.onnx_export import (
    ExportOptions,
    GraphRecord,
    ModelFacts,
    Progress,
    cast_for_precision,
    export_graphs,
    print_progress,
)
from unidg.runtime.bundle import BUNDLE_FORMAT, BUNDLE_FORMAT_VERSION, BUNDLE_KIND, GRAPH_NAMES, LATENT_CHANNELS
from unidg.runtime.manifest import Manifest, ManifestError, read_manifest, tool_versions, verify_files, write_manifest
from unidg.runtime.settings import UniDGSettings

WEIGHTS_KIND = "weights"
TOOLS = (
    "unidg",
    "torch",
    "diffusers",
    "transformers",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "nvidia-modelopt",
    "tensorrt",
)


class WeightsError(ManifestError):
    """A weights folder cannot be exported: no manifest, wrong kind, changed files, missing settings."""


class BundleWriteError(ValueError):
    """The output folder cannot be written as asked."""


@dataclass(frozen=True)
class WeightsInfo:
    path: Path
    manifest: Manifest
    settings: UniDGSettings

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def reference(self) -> dict:
        """The bundle manifest's ``weights`` entry."""
        return {"path": self.path.name, "fingerprint": self.fingerprint}


def read_weights(folder: str | Path, *, verify: bool = True, progress: Progress | None = None) -> WeightsInfo:
    """Check a merged weights folder (``unidg train merge``): manifest kind="weights", file hashes, settings."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"--weights {folder} is not a folder; pass the folder written by `unidg train merge`")
    try:
        manifest = read_manifest(folder, kind=WEIGHTS_KIND)
    except ManifestError as error:
        raise WeightsError(
            f"--weights {folder}: {error}. Export needs a merged weights folder with its manifest.json "
            "(kind 'weights'), as written by `unidg train merge`"
        ) from error
    if verify:
        if progress:
            progress(f"checking {len(manifest.files)} weight files (sha256)")
        try:
            verify_files(folder, manifest)
        except ManifestError as error:
            raise WeightsError(f"--weights {folder}: {error}") from error
    try:
        settings = UniDGSettings.load(folder)
    except FileNotFoundError as error:
        raise WeightsError(f"--weights {folder}: {error}") from error
    return WeightsInfo(path=folder, manifest=manifest, settings=settings)


def load_weights_model(weights: WeightsInfo, settings: UniDGSettings | None = None):
    """The UniDGModel of a checked weights folder (float32, CPU, eval mode)."""
    from unidg.train.loading import load_model

    model = load_model(weights.path)
    if settings is not None:
        model.settings = settings
    return model.eval()


def check_resolution(resolution: int, name: str = "--resolution") -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 16 or resolution % 16:
        raise BundleWriteError(
            f"{name} {resolution!r} is not a positive multiple of 16 (the diptych is cut into 16-pixel tokens); "
            "use e.g. 256, 512 or 768"
        )
    return resolution


# ------------------------------------------------------------------------------------------------ staging
@contextlib.contextmanager
def staged_folder(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block succeeds (and vanishes when it fails)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleWriteError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise BundleWriteError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield staging
        if out.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, retired / out.name)
            os.replace(staging, out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------------ manifest
def graph_table(records: dict[str, GraphRecord]) -> dict[str, dict]:
    missing = [name for name in GRAPH_NAMES if name not in records]
    if missing:
        raise BundleWriteError(f"bundle is missing graphs {missing}")
    return {name: records[name].manifest_entry() for name in GRAPH_NAMES}


def bundle_metadata(
    facts: ModelFacts,
    settings: UniDGSettings,
    options: ExportOptions,
    records: dict[str, GraphRecord],
    weights: WeightsInfo,
    *,
    precision: str | None = None,
    vae_scale: float = 0.3611,
    vae_shift: float = 0.1159,
    extra: dict | None = None,
) -> dict:
    """The ``metadata`` of a bundle manifest (Bundle format v1)."""
    metadata = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_FORMAT_VERSION,
        "settings": settings.to_dict(),
        **facts.metadata(),
        "precision": precision or options.precision,
        "attention": options.attention,
        "attention_form": options.mask_form,
        "latent_channels": LATENT_CHANNELS,
        "vae_scale": vae_scale,
        "vae_shift": vae_shift,
        "batch": "dynamic" if options.dynamic_batch else int(options.batch),
        "sequence": "dynamic" if options.dynamic_sequence else "static",
        "opset": options.opset,
        "guidance_embeds": facts.guidance_embeds,
        "graphs": graph_table(records),
        "weights": weights.reference(),
        "engines": {},
        "tools": tool_versions(*TOOLS),
    }
    if options.dynamic_batch:
        metadata["max_batch"] = options.max_batch
    if extra:
        metadata.update(extra)
    return metadata


def write_bundle_manifest(folder: Path, metadata: dict) -> Manifest:
    return write_manifest(folder, BUNDLE_KIND, metadata)


# ------------------------------------------------------------------------------------------------ export
def export_bundle(
    weights_folder: str | Path,
    out: str | Path,
    *,
    precision: str = "fp32",
    resolution: int | None = None,
    batch: int | str = 1,
    dynamic_sequence: bool = False,
    attention: str = "portable",
    portable_mask: str | None = None,
    overwrite: bool = False,
    verify_weights: bool = True,
    progress: Progress | None = print_progress,
) -> Manifest:
    """``unidg export onnx``: weights folder -> bundle folder (atomically). Returns the bundle manifest."""
    weights = read_weights(weights_folder, verify=verify_weights, progress=progress)
    resolution = check_resolution(weights.settings.resolution if resolution is None else resolution)
    settings = replace(weights.settings, resolution=resolution)
    option_args = {"portable_mask": portable_mask} if portable_mask else {}
    options = ExportOptions(
        resolution=resolution,
        precision=precision,
        batch=batch,
        dynamic_sequence=dynamic_sequence,
        attention=attention,
        **option_args,
    )
    if progress:
        progress(f"loading {weights.path} (fingerprint {weights.fingerprint[:12]})")
    model = cast_for_precision(load_weights_model(weights, settings), precision)
    facts = ModelFacts.of(model, resolution)
    with staged_folder(out, overwrite=overwrite) as staging:
        records = export_graphs(model, staging, options, progress=progress)
        metadata = bundle_metadata(
            facts,
            settings,
            options,
            records,
            weights,
            vae_scale=float(model.vae.config.scaling_factor),
            vae_shift=float(model.vae.config.shift_factor),
        )
        if progress:
            progress("hashing files and writing manifest.json")
        manifest = write_bundle_manifest(staging, metadata)
    if progress:
        progress(f"bundle written to {out}")
    return manifest
