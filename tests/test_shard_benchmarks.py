# Smoke tests of the shard benchmarks: each script runs at a tiny size and prints one JSON line
# with its figures. (The figures themselves are measured by running the scripts at full size.)
from __future__ import annotations

import pytest

from bench_helpers import run_benchmark, run_script


def test_ring_benchmark() -> None:
    figures = run_benchmark("ring.py", "--keys", "20000")
    assert figures["keys"] == 20000
    for field in ("stdev_pct_n10", "stdev_pct_n100", "moved_over_ideal",
                  "uhashring_stdev_pct_n10", "uhashring_stdev_pct_n100",
                  "uhashring_moved_over_ideal", "build_s_n100", "ratio"):
        assert isinstance(figures[field], float) and figures[field] > 0, field
    # Placement is deterministic, so this holds even on 20,000 keys.
    assert figures["moved_over_ideal"] < figures["uhashring_moved_over_ideal"] * 1.2


def test_store_benchmark() -> None:
    figures = run_benchmark("store.py", "--keys", "5000", "--merges", "2000", "--batch", "500")
    assert figures["keys"] == 5000 and figures["merges"] == 2000
    for field in ("merges_per_s", "raw_per_s", "ratio", "merge_fn_per_s", "load_per_s",
                  "reopen_s"):
        assert figures[field] > 0, field


def test_antientropy_benchmark() -> None:
    figures = run_benchmark("antientropy.py", "--keys", "6000")
    assert figures["keys"] == 6000
    assert figures["diffs"] == [1, 100, 3000]
    for field in ("bytes_d1", "seconds_d1", "bytes_d100", "bytes_d10000", "full_state_bytes",
                  "ratio"):
        assert figures[field] > 0, field
    assert figures["bytes_d1"] < figures["bytes_d100"] < figures["bytes_d10000"]


@pytest.mark.parametrize("script", ["ring.py", "store.py", "antientropy.py"])
def test_benchmarks_take_a_size_argument(script: str) -> None:
    done = run_script(script, "--help", timeout=30)
    assert "--keys" in done.stdout
