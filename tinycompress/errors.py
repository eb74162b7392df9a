"""The one exception type the CLI turns into a single line on stderr."""

from __future__ import annotations


class TinycompressError(Exception):
    """A problem the user can fix: what is wrong, and (optionally) how to fix it.

    The CLI prints ``error: <problem> (<fix>)`` on one line and exits non-zero; any other
    exception is a bug and is reported the same way, with the traceback behind
    ``TINYCOMPRESS_DEBUG=1``.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = " ".join(self.problem.split())
        if self.fix:
            text += f" — {' '.join(self.fix.split())}"
        return text


class TrainingDiverged(TinycompressError):
    """The training loss became non-finite (a recipe search counts the trial as failed and goes on)."""
