# Smoke test of benchmarks/http_parser.py: it runs at a tiny size and prints one JSON line
# with its figures. (The figures themselves are measured by running the script at full size.)
from __future__ import annotations

from bench_helpers import run_benchmark


def test_http_parser_benchmark() -> None:
    figures = run_benchmark("http_parser.py", "--streams", "50", "--rounds", "2",
                            "--pipelined", "4")
    assert "error" not in figures, figures
    for parser in ("own", "httptools", "h11"):
        for stream in ("get_status", "put_kv", "pipelined"):
            assert figures[f"{parser}_{stream}_us"] > 0, (parser, stream)
    assert figures["ratio_httptools_put_kv"] > 0 and figures["ratio_h11_pipelined"] > 0
