"""The one error of ``edge-fleet bundle build``, shared by the modules that build a bundle
(``bundle_build``: archive, manifest, samples; ``baseline_build``: the drift baseline), so
neither imports the other for it. The CLI prints it as one line and exits 2."""

from __future__ import annotations

__all__ = ["BuildError", "one_line"]


class BuildError(ValueError):
    """The operator's inputs cannot make a bundle; the message says which and why."""


def one_line(error: Exception, limit: int = 600) -> str:
    """An error's text on one line, cut to ``limit`` characters (runtime messages can be
    pages of C++ context)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
