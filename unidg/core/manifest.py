"""``manifest.json``: what a stage hands on (weights folder, calibration set, bundle) and how the next stage checks it.

A manifest names its kind, carries free-form metadata (shapes, dtypes, settings, tool versions), the sha256 of every
file in the folder and the sha256 of its own metadata (``metadata_sha256``, canonical JSON). ``verify`` refuses a
folder whose files are missing or changed, or whose manifest metadata was edited after it was written, with a message
naming the file. Manifests written before ``metadata_sha256`` existed are read without that check.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from unidg.core.errors import UniDGError

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
WEIGHTS_KIND = "weights"  # a merged weights folder (``unidg train merge``), the one the bundles and calib sets name


class ManifestError(UniDGError):
    """A folder's manifest is missing, malformed, of the wrong kind, or does not match the files."""


class WeightsError(ManifestError):
    """A weights folder or file cannot be used: no manifest, wrong kind, changed, incomplete or of the wrong shape."""


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def tool_versions(*packages: str) -> dict[str, str]:
    """Installed versions of the named distributions (absent ones are skipped), plus Python's."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def metadata_digest(metadata: dict) -> str:
    """sha256 of a manifest's metadata as canonical JSON (sorted keys, no spaces): the same for the written and the
    read form, whatever the indentation."""
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Manifest:
    kind: str  # "weights", "bundle", "calib", ...
    metadata: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    version: int = MANIFEST_VERSION
    metadata_sha256: str | None = None  # as recorded in the file (None: written before it was recorded)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "version": self.version,
            "metadata": self.metadata,
            "metadata_sha256": metadata_digest(self.metadata),
            "files": self.files,
        }

    @property
    def fingerprint(self) -> str:
        """A sha256 over the file hashes: identifies the folder's files (ties bundles and calibration sets to the
        weights they were made from; a weights folder's settings are a file, unidg.json)."""
        text = json.dumps(sorted(self.files.items()))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def content_fingerprint(self) -> str:
        """A sha256 over the file hashes and the metadata: identifies what the folder does, settings included (a
        bundle's settings live in its manifest)."""
        text = json.dumps([sorted(self.files.items()), metadata_digest(self.metadata)])
        return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(folder: str | Path, kind: str, metadata: dict | None = None) -> Manifest:
    """Hash every file under ``folder`` (except the manifest itself) and write ``manifest.json`` atomically."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE and not path.name.startswith("."):
            files[path.relative_to(folder).as_posix()] = sha256_file(path)
    manifest = Manifest(kind=kind, metadata=metadata or {}, files=files)
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


def read_manifest(folder: str | Path, kind: str | None = None) -> Manifest:
    """Read ``manifest.json`` of ``folder``; with ``kind``, refuse a folder made by another stage."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not folder.is_dir():
        raise ManifestError(f"{folder} is not a folder")
    if not path.is_file():
        raise ManifestError(
            f"{folder} has no {MANIFEST_FILE}; it was not written by unidg "
            f"(expected a {kind or 'unidg'} folder made by the matching `unidg` command)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ManifestError(f"{path} is not valid JSON ({error}); re-create the folder") from error
    if not isinstance(data, dict) or "kind" not in data or "files" not in data:
        raise ManifestError(f"{path} is not a unidg manifest (missing 'kind' or 'files')")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MANIFEST_VERSION:
        found = "has no 'version'" if "version" not in data else f"has manifest version {version!r}"
        raise ManifestError(
            f"{path} {found}; this unidg reads manifest versions 1..{MANIFEST_VERSION}: re-create the folder "
            "with the matching `unidg` command"
        )
    if not isinstance(data["files"], dict):
        raise ManifestError(f"{path}: 'files' must be a table of file name -> sha256; re-create the folder")
    if kind is not None and data["kind"] != kind:
        raise ManifestError(f"{folder} is a '{data['kind']}' folder, but a '{kind}' folder is needed here")
    metadata = data.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ManifestError(f"{path}: 'metadata' must be a table; re-create the folder")
    recorded = data.get("metadata_sha256")
    if recorded is not None and not isinstance(recorded, str):
        raise ManifestError(f"{path}: 'metadata_sha256' must be a sha256 string; re-create the folder")
    files = data["files"]
    return Manifest(kind=data["kind"], metadata=metadata, files=files, version=version, metadata_sha256=recorded)


def verify_files(folder: str | Path, manifest: Manifest) -> None:
    """Check every listed file exists and has its recorded sha256, and the metadata its recorded sha256."""
    folder = Path(folder)
    if manifest.metadata_sha256 is not None:
        try:
            actual = metadata_digest(manifest.metadata)
        except ValueError:  # NaN or infinity written in by hand
            actual = "not canonical JSON"
        if actual != manifest.metadata_sha256:
            raise ManifestError(
                f"{folder / MANIFEST_FILE}: its metadata does not match its recorded sha256 "
                f"({actual[:12]}… != {manifest.metadata_sha256[:12]}…); the settings or shapes were edited after "
                "the folder was written; re-create the folder"
            )
    for name, expected in manifest.files.items():
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{path} is listed in {folder / MANIFEST_FILE} but missing; re-create the folder")
        actual = sha256_file(path)
        if actual != expected:
            raise ManifestError(
                f"{path} does not match its manifest (sha256 {actual[:12]}… != {expected[:12]}…); "
                "the file was changed or truncated after export; re-create the folder"
            )


def read_library(folder: Path, kind: str, *, verify: bool, option: str, build: str, error: type[Exception]) -> Manifest:
    """The manifest of a library folder (``kind``), its files re-hashed with ``verify``; a folder that is not one
    raises ``error`` naming ``option``, the folder and the ``build`` command that makes it."""
    try:
        manifest = read_manifest(folder, kind=kind)
        if verify:
            verify_files(folder, manifest)
    except ManifestError as problem:
        raise error(f"{option} {folder}: {problem}; build it with `{build}`") from problem
    return manifest


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
