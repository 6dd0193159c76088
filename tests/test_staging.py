"""runtime.staging: output folders appear whole (temp folder, fsync, rename) with usual permissions, or not at all."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from unidg.core.staging import OutputFolderError, check_output_folder, staged_folder


def usual_folder_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def folder_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


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
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputFolderError, match="already holds files"), staged_folder(out):
        pass
    with pytest.raises(RuntimeError), staged_folder(out, replace=True) as staging:
        (staging / "new.txt").write_text("new")
        raise RuntimeError("stop")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    with staged_folder(out, replace=True) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert hidden(tmp_path) == []


def test_an_empty_folder_is_accepted_and_filled(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    with staged_folder(out) as staging:
        (staging / "a.txt").write_text("a")
    assert [p.name for p in out.iterdir()] == ["a.txt"]


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
