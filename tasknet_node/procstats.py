# The node process's own resource figures, as operators see them (/status "process",
# /metrics tasknet_process_*), read from Linux's /proc.
# Lives here: parsing /proc/self/status and /proc/self/stat, and turning them into the status
# section and metrics. Must not live here: acting on them (runner.py returns free heap).
#
# Why resident memory is split: LevelDB maps its table files read-only, and every page of them
# that a read or a compaction touched counts in VmRSS (as RssFile, with the shared libraries)
# although it is clean page cache that the kernel may drop at any time. What the node itself
# holds (Python objects, memtables, the block cache, the C heap) is RssAnon. An idle node with
# an empty store shows about 30 MB of RssFile (the libraries); a loaded one shows more, as much
# as its reads and compactions touched lately (benchmarks/cluster.py reports both parts).
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from .api import Metric

_STATUS_FIELDS = {"VmRSS": "rss", "RssAnon": "rss_anon", "RssFile": "rss_file",
                  "VmHWM": "peak_rss", "Threads": "threads"}


def parse_status(text: str) -> dict[str, int]:
    """The fields of a /proc/PID/status text this module reports: memory in bytes, threads
    as a count. Fields the kernel does not show (RssAnon before Linux 4.5) are left out."""
    figures: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        field = _STATUS_FIELDS.get(name)
        if field is None:
            continue
        words = rest.split()
        if not words or not words[0].isdigit():
            raise ValueError(f"unexpected /proc status line {line!r}")
        value = int(words[0])
        figures[field] = value * 1024 if words[1:] == ["kB"] else value
    return figures


def parse_cpu_seconds(stat_text: str, ticks_per_s: int) -> float:
    """User + system CPU time from a /proc/PID/stat text (the name field may hold spaces
    and parentheses, so fields are counted from the last ')')."""
    fields = stat_text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


class ProcessFigures:
    """Reads this process's figures on demand (a status or metrics request)."""

    def __init__(self, proc: Path = Path("/proc/self")) -> None:
        self._proc = proc
        self._ticks = os.sysconf("SC_CLK_TCK")

    def read(self) -> dict[str, float]:
        """Memory in bytes, cpu_s, threads and open_fds; {} where /proc is not there."""
        try:
            figures: dict[str, float] = dict(parse_status((self._proc / "status").read_text()))
            figures["cpu_s"] = parse_cpu_seconds((self._proc / "stat").read_text(), self._ticks)
            figures["open_fds"] = len(os.listdir(self._proc / "fd"))
        except OSError:
            return {}
        return figures

    def status(self) -> dict[str, Any]:
        figures = self.read()
        shown: dict[str, Any] = {}
        for field in ("rss", "rss_anon", "rss_file", "peak_rss"):
            if field in figures:
                shown[f"{field}_mb"] = round(figures[field] / 2**20, 1)
        for field in ("cpu_s", "threads", "open_fds"):
            if field in figures:
                shown[field] = round(figures[field], 2)
        return shown

    def metrics(self) -> Iterable[Metric]:
        figures = self.read()
        for field, name, kind, text in _METRICS:
            if field in figures:
                yield Metric(name, figures[field], kind, text)


_METRICS: tuple[tuple[str, str, Literal["counter", "gauge"], str], ...] = (
    ("rss", "process_resident_memory_bytes", "gauge", "resident memory (VmRSS)"),
    ("rss_anon", "process_resident_anon_memory_bytes", "gauge",
     "resident memory the process holds itself (RssAnon)"),
    ("rss_file", "process_resident_file_memory_bytes", "gauge",
     "resident pages of mapped files: shared libraries and LevelDB tables (RssFile)"),
    ("cpu_s", "process_cpu_seconds", "counter", "user and system CPU time"),
    ("open_fds", "process_open_fds", "gauge", "open file descriptors"),
    ("threads", "process_threads", "gauge", "operating system threads"),
)
