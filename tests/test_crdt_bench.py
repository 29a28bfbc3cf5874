# Smoke test: the CRDT benchmark script runs at a tiny size and prints one JSON line.
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "crdt.py"


def test_crdt_benchmark_prints_one_json_line() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True,
                          text=True, timeout=60, check=True)
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["benchmark"] == "crdt_merge"
    assert set(report["types"]) == {"lww", "mvreg", "gcounter", "pncounter", "orset", "ormap"}
    for figures in report["types"].values():
        for name in ("merge_per_s", "merge_encoded_per_s", "ideal_msgpack_per_s"):
            assert figures[name] > 0
        computed = figures["merge_encoded_per_s"] / figures["ideal_msgpack_per_s"]
        assert abs(figures["ratio"] - computed) < 0.002
    assert report["ratio"] == min(f["ratio"] for f in report["types"].values())
    assert report["lww_merge_encoded_per_s"] > 0 and report["gcounter_merge_encoded_per_s"] > 0
