"""A timestamped progress log for benchmark scripts: printed as it goes and kept for the results file."""

from __future__ import annotations

import os
import sys
import time


def command_line() -> str:
    """The command that ran this script, with the OMP_NUM_THREADS it really ran under (not a fixed guess) and the
    script's path from the repository root (``bench/...``), whatever the working directory was."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} python " + " ".join([script] + sys.argv[1:])


class RunLog:
    def __init__(self):
        self.t0 = time.time()
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        msg = f"[{time.time() - self.t0:7.0f}s] {msg}"
        print(msg, flush=True)
        self.lines.append(msg)
