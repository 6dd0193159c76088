"""Output folders written whole or not at all: build in a hidden folder beside the target, fsync, rename into place.

Every command that writes a folder (weights, calibration sets, Triton repositories, ``unidg generate``, the demo) goes
through ``staged_folder``. The folder is created before any work starts, so an unwritable place or a file where a
parent folder should be is reported at once; on failure the staging folder, and any parent folder made for it, are
removed, so nothing is left behind. Folders get the usual permissions (0777 less the umask), as ``mkdir`` gives them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from unidg.core.errors import UniDGError


class OutputFolderError(UniDGError):
    """An output folder cannot be written where or as asked; the message names the folder and the fix."""


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_folder(out: str | Path, *, replace: bool = False, flag: str = "--out") -> Path:
    """Refuse, without writing anything, an ``out`` that cannot become a new folder.

    ``out`` may be missing or an empty folder; a non-empty folder only with ``replace``. Its nearest existing
    ancestor must be a folder we can write in.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputFolderError(f"{flag} {out} exists and is not a folder; pick a new folder")
        if not replace and any(out.iterdir()):
            raise OutputFolderError(f"{flag} {out} already holds files; pick a new or empty folder")
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


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (and ``folder`` itself) to disk."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
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
    except OSError:
        if not out.is_dir():
            raise
        if not replace:
            raise OutputFolderError(f"{flag} {out} was filled by someone else meanwhile; pick a new folder") from None
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


__all__ = ["OutputFolderError", "check_output_folder", "fsync_folder", "fsync_tree", "staged_folder"]
