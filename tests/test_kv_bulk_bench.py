# Smoke test: the bulk-op benchmark script runs at tiny sizes and prints one JSON line with
# its figures and ratios (the figures themselves are not judged here: no timed tests).
from __future__ import annotations

from bench_helpers import run_benchmark


def test_bulk_ops_benchmark_prints_one_json_line() -> None:
    report = run_benchmark("bulk_ops.py", "--quick")
    assert report["benchmark"] == "kv_bulk_ops"
    assert [size["members"] for size in report["sizes"]] == [50, 200]
    for size in report["sizes"]:
        for name in ("sadd_s", "srem_s", "delete_s", "ideal_encode_s"):
            assert size[name] > 0
        assert size["state_bytes"] > 0
        assert abs(size["ratio"] - size["sadd_s"] / size["ideal_encode_s"]) < 0.05 * size["ratio"]
    assert report["ratio"] == max(size["ratio"] for size in report["sizes"])
    assert report["linearity"] > 0
