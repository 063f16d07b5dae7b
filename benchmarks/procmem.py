"""Peak memory of a set of processes, sampled in a thread (shared by the benchmarks).

Two totals: summed RSS (counts pages shared between processes — libraries, the plasma store mapping — once per
process, so it over-states) and summed PSS (each shared page split among its users: the machine's real footprint).
PSS comes from ``/proc/<pid>/smaps_rollup`` (Linux); elsewhere it reads as RSS.
"""
from __future__ import annotations

import threading
from typing import Callable

import psutil


def rss_pss(p: psutil.Process) -> tuple[int, int]:
    """RSS and PSS of one process: ``/proc/<pid>/smaps_rollup`` (one summary, cheap for the kernel to produce),
    else psutil's full smaps walk, else RSS for both."""
    try:
        fields = {}
        with open(f"/proc/{p.pid}/smaps_rollup") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss"):
                    fields[key] = int(rest.split()[0]) * 1024
        return fields["Rss"], fields["Pss"]
    except (OSError, KeyError, ValueError):
        info = p.memory_full_info()
        return info.rss, getattr(info, "pss", info.rss)


def this_process_tree() -> list[psutil.Process]:
    """This process and all its descendants (a local Ray started here: GCS, raylet, workers, actors)."""
    me = psutil.Process()
    return [me] + me.children(recursive=True)


class PeakMemory(threading.Thread):
    """Peak summed RSS and PSS of ``processes()`` (called at every sample), sampled every ``period`` s."""

    def __init__(self, processes: Callable[[], list[psutil.Process]] = this_process_tree, period: float = 1.0
                 ) -> None:
        super().__init__(daemon=True)
        self.processes, self.period = processes, period
        self.peak_rss, self.peak_pss, self._halt = 0, 0, threading.Event()

    def totals(self) -> tuple[int, int]:
        rss = pss = 0
        for p in self.processes():
            try:
                r, q = rss_pss(p)
                rss, pss = rss + r, pss + q
            except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                pass
        return rss, pss

    def run(self) -> None:
        while not self._halt.is_set():
            rss, pss = self.totals()
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self._halt.wait(self.period)

    def stop(self) -> tuple[int, int]:
        """Stop sampling; ``(peak RSS sum, peak PSS sum)`` in bytes."""
        self._halt.set()
        self.join()
        return self.peak_rss, self.peak_pss
