"""What the ``unidg bench`` commands share when they run: Triton's interpreter switch and the command line a report
records. Standard library only, so a command can call it before anything imports triton."""

from __future__ import annotations

import os
import sys

from unidg.core.errors import OptionError


def use_triton_interpreter() -> None:
    """Set ``TRITON_INTERPRET=1`` for this process. Triton reads it when it is first imported: a kernel runs on the
    CPU only that way, so a process that already imported triton without it is refused."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise OptionError("triton is already imported without TRITON_INTERPRET=1; run the command in a new process")
    os.environ["TRITON_INTERPRET"] = "1"


def command_line(default: str) -> str:
    """The ``unidg bench ...`` command as typed, for a report's header; ``default`` when called outside the CLI."""
    return "unidg " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else default
