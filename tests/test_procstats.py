# Parsing of /proc figures (tasknet_node/procstats.py) on fixed texts and on this process.
# (A running node's /status "process" section is checked in test_node_process.py.)
import os
from pathlib import Path

import pytest

from tasknet_node.procstats import ProcessFigures, parse_cpu_seconds, parse_status

STATUS = """Name:\tpython
VmPeak:\t  900000 kB
VmHWM:\t  200000 kB
VmRSS:\t  150000 kB
RssAnon:\t  100000 kB
RssFile:\t   49000 kB
RssShmem:\t    1000 kB
Threads:\t5
"""


def test_status_memory_is_in_bytes_and_threads_a_count():
    figures = parse_status(STATUS)
    assert figures == {"peak_rss": 200000 * 1024, "rss": 150000 * 1024,
                       "rss_anon": 100000 * 1024, "rss_file": 49000 * 1024, "threads": 5}


def test_fields_an_old_kernel_lacks_are_left_out_and_garbage_is_refused():
    old = "\n".join(line for line in STATUS.splitlines() if not line.startswith("Rss"))
    assert set(parse_status(old)) == {"peak_rss", "rss", "threads"}
    with pytest.raises(ValueError, match="VmRSS"):
        parse_status("VmRSS:\tlots kB\n")


def test_cpu_is_counted_from_the_last_parenthesis_of_the_name():
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 30
    text = f"42 (a (weird) name) {' '.join(fields)}"
    assert parse_cpu_seconds(text, 100) == 4.0


def test_this_process_figures_agree_with_its_own_proc():
    figures = ProcessFigures().read()
    own = parse_status(Path(f"/proc/{os.getpid()}/status").read_text())
    assert abs(figures["rss"] - own["rss"]) < 0.25 * own["rss"]
    assert figures["cpu_s"] > 0 and figures["open_fds"] >= 3
    status = ProcessFigures().status()
    assert status["rss_mb"] > 1 and status["rss_anon_mb"] <= status["rss_mb"]
    samples = {m.name: m for m in ProcessFigures().metrics()}
    assert samples["process_cpu_seconds"].kind == "counter"
    assert samples["process_resident_memory_bytes"].value > 2**20


def test_without_proc_there_are_no_figures(tmp_path: Path):
    missing = ProcessFigures(tmp_path / "no-such-proc")
    assert missing.read() == {} and missing.status() == {} and list(missing.metrics()) == []
