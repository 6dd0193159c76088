"""File-system conditions the tests share."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def immutable(folder: Path) -> Iterator[None]:
    """``folder`` immutable (chattr +i) for the block; the test is skipped where that is not permitted."""
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i not permitted here (needs root and a filesystem with inode flags)")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", str(folder)], check=True)
