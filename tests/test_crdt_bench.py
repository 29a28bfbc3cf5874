# Smoke test: the CRDT benchmark script runs at a tiny size and prints one JSON line.
from __future__ import annotations

from bench_helpers import run_benchmark


def test_crdt_benchmark_prints_one_json_line() -> None:
    report = run_benchmark("crdt.py", "--quick")
    assert report["benchmark"] == "crdt_merge"
    assert set(report["types"]) == {"lww", "mvreg", "gcounter", "pncounter", "orset", "ormap"}
    for figures in report["types"].values():
        for name in ("merge_per_s", "merge_encoded_per_s", "ideal_msgpack_per_s"):
            assert figures[name] > 0
        computed = figures["merge_encoded_per_s"] / figures["ideal_msgpack_per_s"]
        assert abs(figures["ratio"] - computed) < 0.002
    assert report["ratio"] == min(f["ratio"] for f in report["types"].values())
    assert report["lww_merge_encoded_per_s"] > 0 and report["gcounter_merge_encoded_per_s"] > 0
