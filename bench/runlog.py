"""A timestamped progress log for benchmark scripts: printed as it goes and kept for the results file."""

from __future__ import annotations

import time


class RunLog:
    def __init__(self):
        self.t0 = time.time()
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        msg = f"[{time.time() - self.t0:7.0f}s] {msg}"
        print(msg, flush=True)
        self.lines.append(msg)
