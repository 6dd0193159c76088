"""Checked input folders and atomic output folders, shared by ``unidg calib`` and ``unidg export``.

A merged weights folder (``unidg train merge``) is a save_model folder plus ``unidg.json`` and ``manifest.json``
kind="weights"; its manifest fingerprint ties calibration sets and bundles to it. Outputs are written into a temporary
folder beside the target and renamed into place at the end, so nothing half-written is ever left behind.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from unidg.core.manifest import WEIGHTS_KIND, Manifest, ManifestError, WeightsError, read_manifest, verify_files
from unidg.core.settings import UniDGSettings
from unidg.core.staging import OutputFolderError, check_output_folder
from unidg.core.staging import staged_folder as runtime_staged_folder

Progress = Callable[[str], None]


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
            f"--weights {folder}: {error}. It needs a merged weights folder with its manifest.json "
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


# ------------------------------------------------------------------------------------------------ staging
def check_output(out: str | Path, *, overwrite: bool = False) -> Path:
    """Refuse an ``--out`` that cannot be written before any work: an existing one without ``overwrite``, and with it
    one that a unidg command did not write or that lies in the package's source tree (runtime.staging's rules)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputFolderError(f"{out} already exists; choose another --out or pass --overwrite")
    return check_output_folder(out, replace=True)


@contextlib.contextmanager
def staged_folder(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``out`` that becomes ``out`` when the block succeeds (and vanishes when it fails)."""
    out = check_output(out, overwrite=overwrite)
    with runtime_staged_folder(out, replace=True) as staging:
        yield staging
