"""Output folders written whole or not at all: build in a hidden folder beside the target, fsync, rename into place.

Every command that writes a folder (weights, calibration sets, Triton repositories, ``unidg generate``, the demo) goes
through ``staged_folder``. The folder is created before any work starts, so an unwritable place or a file where a
parent folder should be is reported at once; on failure the staging folder, and any parent folder made for it, are
removed, so nothing is left behind. Folders get the usual permissions (0777 less the umask), as ``mkdir`` gives them.

Every staged folder carries the marker file ``.unidg-output``. A non-empty folder is replaced (``--overwrite``) only
when it carries that marker, so no command ever deletes a folder it did not write; and no folder is written inside
the package's own source tree (``unidg calib build --out calib`` run in a checkout would otherwise name ``calib/``).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import secrets
import shutil
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

from unidg.core.errors import UniDGError

OUTPUT_MARKER = ".unidg-output"
_MARKER_TEXT = "This folder was written by unidg; unidg commands may replace it when asked to (--overwrite).\n"
# The package and its top-level subpackages (each maps to its own source folder in a checkout).
_PACKAGE_NAMES = ("unidg", "unidg.runtime", "unidg.train", "unidg.export", "unidg.calib")
# Linux inode flags (FS_IOC_GETFLAGS): a folder with either cannot be renamed over, whatever its permissions.
_FS_IOC_GETFLAGS = 0x80086601
_FS_IMMUTABLE_FL = 0x10
_FS_APPEND_FL = 0x20


class OutputFolderError(UniDGError):
    """An output folder cannot be written where or as asked; the message names the folder and the fix."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def package_source_folders() -> list[Path]:
    """The source folders of the installed unidg package (found without importing the subpackages)."""
    folders = []
    for name in _PACKAGE_NAMES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            folders.append(Path(location).resolve())
    return folders


def is_unidg_output(folder: Path) -> bool:
    """Whether ``folder`` was written by a unidg command (it carries the marker every staged folder gets)."""
    return (folder / OUTPUT_MARKER).is_file() and not (folder / OUTPUT_MARKER).is_symlink()


def _replace_blocker(folder: Path) -> str | None:
    """Why renaming a folder over the existing empty ``folder`` would fail although its parent is writable."""
    if os.path.ismount(folder):
        return "it is a mount point"
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            flags = struct.unpack("i", fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(8))[:4])[0]
        finally:
            os.close(fd)
        if flags & _FS_IMMUTABLE_FL:
            return "it is immutable (chattr +i)"
        if flags & _FS_APPEND_FL:
            return "it is append-only (chattr +a)"
    parent = folder.absolute().parent
    parent_stat = parent.stat()
    if parent_stat.st_mode & 0o1000 and os.geteuid() not in (0, parent_stat.st_uid, folder.stat().st_uid):
        return f"{parent} has the sticky bit and neither it nor the folder is yours"
    return None


def check_output_folder(out: str | Path, *, replace: bool = False, flag: str = "--out") -> Path:
    """Refuse, without writing anything, an ``out`` that cannot become a new folder.

    ``out`` may be missing or an empty folder; a non-empty folder only with ``replace``, and only when a unidg command
    wrote it (it carries ``OUTPUT_MARKER``). ``out`` must lie outside the package's source tree, and its nearest
    existing ancestor must be a folder we can write in.
    """
    out = Path(out)
    resolved = out.resolve()
    for source in package_source_folders():
        if resolved == source or source in resolved.parents:
            raise OutputFolderError(
                f"{flag} {out} lies inside unidg's own source folder {source}; pick a folder outside it"
            )
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputFolderError(f"{flag} {out} exists and is not a folder; pick a new folder")
        if any(out.iterdir()):
            if not replace:
                raise OutputFolderError(f"{flag} {out} already holds files; pick a new or empty folder")
            if not is_unidg_output(out):
                raise OutputFolderError(
                    f"{flag} {out} holds files unidg did not write (no {OUTPUT_MARKER} marker), so it is never "
                    "replaced; pick a new folder, or empty it yourself"
                )
        else:
            blocker = _replace_blocker(out)
            if blocker:
                raise OutputFolderError(
                    f"{flag} {out} cannot be replaced by the result: {blocker}; pick another folder"
                )
    parent = out.absolute().parent
    ancestor = _nearest_existing(parent)
    if not ancestor.is_dir():
        raise OutputFolderError(f"{flag} {out}: {ancestor} is a file, not a folder; pick a path inside a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{flag} {out}: {ancestor} is not writable; pick a folder you can write in")
    return out


def _make_parents(parent: Path) -> list[Path]:
    """``mkdir -p parent``; returns the folders it created, deepest last."""
    missing = []
    path = parent
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        created.append(folder)
    return created


def _new_hidden_folder(parent: Path, name: str) -> Path:
    while True:
        candidate = parent / f".{name}.{secrets.token_hex(4)}.partial"
        try:
            candidate.mkdir()  # mode 0777 less the umask (mkdtemp would make 0700)
        except FileExistsError:
            continue
        return candidate


def give_usual_mode(path: str | Path) -> None:
    """A private file (0600) gets the permissions a plain ``open()`` gives (0666 less the umask): safetensors writes
    0600, which left weights and checkpoints unreadable to the group beside 0644 JSON files."""
    if stat.S_IMODE(os.stat(path).st_mode) == 0o600:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and ``folder`` itself) to disk; private files (0600) get the
    usual mode first."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            give_usual_mode(path)
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        for name in (*dirs, "."):
            fsync_folder(Path(root) / name)


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename inside it) to disk, where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_into_place(staging: Path, out: Path, replace: bool, flag: str) -> None:
    try:
        os.replace(staging, out)  # atomic when out is missing or an empty folder
        return
    except OSError as error:
        if not out.is_dir():
            raise
        if not any(out.iterdir()):
            raise OutputFolderError(
                f"{flag} {out}: cannot put the result in place ({error.strerror or error}); pick another folder"
            ) from error
        if not replace:
            raise OutputFolderError(f"{flag} {out} was filled by someone else meanwhile; pick a new folder") from None
        if not is_unidg_output(out):
            raise OutputFolderError(
                f"{flag} {out} was filled meanwhile with files unidg did not write; it is kept: pick a new folder"
            ) from None
    retired = _new_hidden_folder(out.parent, out.name)
    os.replace(out, retired / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(retired / out.name, out)
        retired.rmdir()
        raise
    shutil.rmtree(retired, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: str | Path, *, replace: bool = False, flag: str = "--out") -> Iterator[Path]:
    """A new folder beside ``out`` to write into; when the block succeeds it is fsynced and renamed to ``out``.

    ``replace``: an existing non-empty ``out`` is replaced (the caller has decided it may be); otherwise only a
    missing or empty ``out`` is accepted. When the block fails, the staging folder and any parent folders made for it
    are removed and ``out`` is left as it was.
    """
    out = check_output_folder(out, replace=replace, flag=flag)
    parent = out.absolute().parent
    try:
        created = _make_parents(parent)
        staging = _new_hidden_folder(parent, out.name)
    except OSError as error:
        raise OutputFolderError(
            f"{flag} {out}: cannot create it ({error.strerror or error}); pick another folder"
        ) from error
    try:
        (staging / OUTPUT_MARKER).write_text(_MARKER_TEXT)
        yield staging
        fsync_tree(staging)
        _swap_into_place(staging, out, replace, flag)
        fsync_folder(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


__all__ = [
    "OUTPUT_MARKER",
    "OutputFolderError",
    "check_output_folder",
    "fsync_folder",
    "fsync_tree",
    "give_usual_mode",
    "is_unidg_output",
    "package_source_folders",
    "staged_folder",
]
