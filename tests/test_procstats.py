# Parsing of /proc figures (tasknet_node/procstats.py) on fixed texts and on this process.
# (A running node's /status "process" section is checked in test_node_process.py.)
import threading
import time
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


def test_this_process_figures_follow_what_the_process_does(tmp_path: Path):
    """Each figure moves by what the test does in between, measured independently."""
    figures = ProcessFigures()
    before, cpu_before = figures.read(), time.process_time()
    block = bytearray(64 * 2**20)  # 64 MiB, every page written: resident and anonymous
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    files = [(tmp_path / f"f{i}").open("w") for i in range(20)]
    release = threading.Event()
    extra = threading.Thread(target=release.wait, daemon=True)
    extra.start()
    deadline = time.process_time() + 0.3  # bounded CPU burn
    while time.process_time() < deadline:
        pass
    try:
        after, cpu_after = figures.read(), time.process_time()
    finally:
        release.set()
        extra.join(10)
        for f in files:
            f.close()
    assert 60 * 2**20 <= after["rss"] - before["rss"] <= 80 * 2**20
    assert 60 * 2**20 <= after["rss_anon"] - before["rss_anon"] <= 80 * 2**20
    assert after["peak_rss"] >= after["rss"]
    assert after["open_fds"] - before["open_fds"] == 20
    # the kernel counts CPU in clock ticks (1/100 s here): agree within a few of them
    assert abs((after["cpu_s"] - before["cpu_s"]) - (cpu_after - cpu_before)) < 0.05
    assert after["threads"] - before["threads"] == 1
    shown = figures.status()
    assert abs(shown["rss_mb"] * 2**20 - figures.read()["rss"]) < 8 * 2**20
    metrics = {m.name: m.value for m in figures.metrics()}
    assert abs(metrics["process_resident_memory_bytes"] - figures.read()["rss"]) < 8 * 2**20
    del block


def test_without_proc_there_are_no_figures(tmp_path: Path):
    missing = ProcessFigures(tmp_path / "no-such-proc")
    assert missing.read() == {} and missing.status() == {} and list(missing.metrics()) == []
