"""runtime.staging: output folders appear whole (temp folder, fsync, rename) with usual permissions, or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from fs_fixtures import immutable

from unidg.core.staging import (
    OUTPUT_MARKER,
    OutputFolderError,
    check_output_folder,
    package_source_folders,
    staged_folder,
)


def usual_folder_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def folder_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def written(folder: Path) -> list[str]:
    """The names in an output folder besides the marker every staged folder carries."""
    return sorted(p.name for p in folder.iterdir() if p.name != OUTPUT_MARKER)


def test_a_new_folder_appears_whole_with_the_umask_permissions(tmp_path):
    out = tmp_path / "a" / "b" / "result"
    with staged_folder(out) as staging:
        assert staging.parent == out.parent and staging.name.startswith(".result.")
        assert not out.exists()  # nothing visible under the final name while writing
        (staging / "sub").mkdir()
        (staging / "sub" / "x.txt").write_text("x")
    assert (out / "sub" / "x.txt").read_text() == "x"
    assert folder_mode(out) == usual_folder_mode()  # not mkdtemp's 0700
    assert hidden(out.parent) == []


def test_a_failure_leaves_nothing_behind_not_even_the_parent_folders_it_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "result"
    with pytest.raises(RuntimeError, match="boom"), staged_folder(out) as staging:
        (staging / "half.bin").write_bytes(b"half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_kept_on_failure_and_replaced_on_success(tmp_path):
    out = tmp_path / "result"
    with staged_folder(out) as staging:
        (staging / "old.txt").write_text("old")
    assert (out / OUTPUT_MARKER).is_file() and written(out) == ["old.txt"]
    with pytest.raises(OutputFolderError, match="already holds files"), staged_folder(out):
        pass
    with pytest.raises(RuntimeError), staged_folder(out, replace=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("stop")
    assert written(out) == ["old.txt"]
    with staged_folder(out, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert written(out) == ["new.txt"] and (out / OUTPUT_MARKER).is_file()
    assert hidden(tmp_path) == []


def test_a_folder_unidg_did_not_write_is_never_replaced(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.py").write_text("precious")
    ran = []
    with pytest.raises(OutputFolderError, match=f"did not write \\(no {OUTPUT_MARKER} marker\\)"):
        with staged_folder(out, replace=True):
            ran.append(True)
    assert ran == [] and (out / "notes.py").read_text() == "precious" and hidden(tmp_path) == []
    with pytest.raises(OutputFolderError, match="did not write"):
        check_output_folder(out, replace=True)
    # The marker as a link (to a file elsewhere) does not count: only a folder unidg wrote carries it.
    (tmp_path / "elsewhere").write_text("x")
    (out / OUTPUT_MARKER).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputFolderError, match="did not write"):
        check_output_folder(out, replace=True)


def test_the_package_source_tree_is_refused_as_an_output(tmp_path):
    """check_output_folder writes nothing, so it is asked about the real source folders of the installed package."""
    sources = package_source_folders()
    names = {folder.name for folder in sources}
    assert {"calib", "runtime", "train", "export"} <= names, sources
    for source in sources:
        for out in (source, source / "new-output", source / "deeper" / "out"):
            with pytest.raises(OutputFolderError, match="inside unidg's own source folder"):
                check_output_folder(out, replace=True)
    calib = next(folder for folder in sources if folder.name == "calib")
    os.chdir(calib.parent)
    try:
        with pytest.raises(OutputFolderError, match=r"--out calib lies inside unidg's own source folder"):
            check_output_folder("calib", replace=True)
    finally:
        os.chdir(tmp_path)


def test_private_files_get_the_usual_mode(tmp_path):
    out = tmp_path / "result"
    with staged_folder(out) as staging:
        (staging / "weights.safetensors").write_bytes(b"x")
        os.chmod(staging / "weights.safetensors", 0o600)  # what safetensors' save_file gives
        (staging / "tool").write_bytes(b"x")
        os.chmod(staging / "tool", 0o755)
    assert stat.S_IMODE((out / "weights.safetensors").stat().st_mode) == usual_folder_mode() & 0o666
    assert stat.S_IMODE((out / "tool").stat().st_mode) == 0o755  # other modes are left as they were made


def test_an_empty_folder_is_accepted_and_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with staged_folder(out) as staging:
        (staging / "a.txt").write_text("a")
    assert written(out) == ["a.txt"]


def test_an_immutable_empty_folder_is_refused_before_the_block_runs(tmp_path):
    out = tmp_path / "frozen"
    out.mkdir()
    ran = []
    with immutable(out):
        with pytest.raises(
            OutputFolderError, match=r"--out .*frozen cannot be replaced by the result: it is immutable"
        ):
            with staged_folder(out):
                ran.append(True)
    assert ran == [] and hidden(tmp_path) == [] and list(out.iterdir()) == []


def test_bad_places_are_refused_before_anything_is_written(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(OutputFolderError, match=r"--out .*file.txt is a file, not a folder"):
        check_output_folder(blocker / "sub" / "out")
    with pytest.raises(OutputFolderError, match="exists and is not a folder"):
        check_output_folder(blocker)
    with pytest.raises(OutputFolderError, match="--weights"), staged_folder(blocker, flag="--weights"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="running as root: folder modes not enforced")
def test_an_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        with pytest.raises(OutputFolderError, match="not writable"):
            check_output_folder(locked / "out")
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc: no folder where mkdir fails even for root")
def test_a_place_where_no_folder_can_be_made_is_refused_before_the_block_runs():
    ran = []
    with pytest.raises(OutputFolderError, match=r"--out /proc/unidg-out/result: cannot create it"):
        with staged_folder("/proc/unidg-out/result"):
            ran.append(True)
    assert ran == []
