"""The one root of the errors a user can fix.

Every error that comes from the user's input or environment — an image, mask, option, settings file, folder or bundle
that cannot be used — derives from ``UniDGError``, and its message names the input and the fix. The command line
prints such an error as one line without a traceback; any other exception is a defect of the program and keeps its
traceback. ``UniDGError`` is a ``ValueError``, so library callers that catch ``ValueError`` keep working.
"""

from __future__ import annotations


class UniDGError(ValueError):
    """An input, option, file or folder the user can fix; the message names it and says how."""


class OptionError(UniDGError):
    """A command-line option or combination of options is refused before any work starts."""
