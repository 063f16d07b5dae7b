"""The driver's progress report: commits merged / total with an ETA, on a terminal or as log lines."""
from __future__ import annotations

import math
import sys
import time


class Progress:
    """Commits merged / total with ETA: a tqdm bar on a terminal, else a log line to stderr every ~10 %."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.total, self.done, self.t0, self.next_line = total, 0, time.time(), 0.1
        self.bar = tqdm(total=total, desc="commits merged", unit="commit", dynamic_ncols=True) \
            if sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done / self.total >= self.next_line - 1e-9:
            elapsed = time.time() - self.t0
            eta = elapsed / self.done * (self.total - self.done) if self.done else math.nan
            print(f"forgesim: {self.done}/{self.total} commits merged, {elapsed:.0f}s elapsed, ETA {eta:.0f}s",
                  file=sys.stderr, flush=True)
            while self.next_line <= self.done / self.total + 1e-9:
                self.next_line += 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
