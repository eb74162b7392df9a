"""Progress and log lines: on stderr, so stdout holds only results (tables, JSON)."""

from __future__ import annotations

import sys


def log_to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
