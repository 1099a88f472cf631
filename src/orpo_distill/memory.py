"""How much memory this process holds: the resident set now and its peak, in MiB.

Every event of ``metrics.jsonl`` carries the peak since the event before it (``peak_rss_mib``, sampled by a
daemon thread), so each stage's peak can be read off its events and the demo's
closing table shows it: a step that retains memory, or a stage that needs more than the machine has,
shows in the run's own record (issue 36: the demo's RSS climbed to 12 GiB).
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time

_MIB = 1024 * 1024


def rss_mib() -> float:
    """The resident set size now (Linux: ``/proc/self/statm``); the lifetime peak where that is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / _MIB
    except (OSError, ValueError, IndexError):
        return lifetime_peak_rss_mib()


def lifetime_peak_rss_mib() -> float:
    """The process's peak resident set size since it started (``getrusage``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024


class _IntervalPeak:
    """The largest RSS seen since the last :meth:`take`, by a daemon thread reading it every ``interval``
    seconds (started on first use). The kernel's own peak (``VmHWM``, ``ru_maxrss``) is left untouched,
    so ``/usr/bin/time`` and the like still see the process's true lifetime peak."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak = 0.0
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def _watch(self) -> None:
        while True:
            now = rss_mib()
            with self.lock:
                self.peak = max(self.peak, now)
            time.sleep(self.interval)

    def take(self) -> float:
        """The peak since the last call (or since the watcher started), and a new interval from now."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._watch, name="orpo-distill-rss", daemon=True)
            self.thread.start()
        now = rss_mib()
        with self.lock:
            peak, self.peak = max(self.peak, now), now
        return peak


_INTERVAL_PEAK = _IntervalPeak()


def interval_peak_rss_mib() -> float:
    """The peak RSS since the previous call (sampled every 0.2 s, so a spike shorter than that can be
    missed); :class:`~orpo_distill.metrics.MetricsLog` logs it with every event."""
    return _INTERVAL_PEAK.take()
