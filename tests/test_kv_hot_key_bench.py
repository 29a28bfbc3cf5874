# Smoke test: the hot-key benchmark script runs at tiny sizes and prints one JSON line with
# its figures and ratios (the figures themselves are not judged here: no timed tests).
from __future__ import annotations

from bench_helpers import run_benchmark


def test_hot_key_benchmark_prints_one_json_line() -> None:
    report = run_benchmark("hot_key.py", "--quick")
    assert report["benchmark"] == "kv_hot_key"
    assert report["members"] == 200 and report["hot_ops"] == 20 and report["state_bytes"] > 0
    assert report["distinct_ops"] == 100
    for name in ("hot_s", "hot_ms_per_op", "hot_ideal_ms", "hot_ratio", "distinct_ops_per_s",
                 "distinct_ideal_per_s", "distinct_ratio", "distinct_cpu_us_per_op"):
        assert report[name] > 0, name
