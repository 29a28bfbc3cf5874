# Benchmark: balance and movement of shard.ring against uhashring 2.5 (ketama consistent hashing),
# measured on the same keys in the same run.
# Figures: stdev of keys per node (as primary) in % of the mean at n = 10 and n = 100, keys moved
# when an 11th node joins 10 divided by the ideal 1/11 of all keys, ring build time, and the same
# for uhashring (uhashring_*). ratio_* = ours / uhashring for each figure (lower is better), and
# `ratio` = the worst of them: below 1 means the ring beats uhashring on every figure.
# Must not live here: any ring logic (shard.ring provides it).
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from uhashring import HashRing  # noqa: E402

from shard.ring import Ring  # noqa: E402


def names(n: int) -> list[str]:
    return [f"node-{i}" for i in range(n)]


def spread_pct(loads: Sequence[int]) -> float:
    return 100 * statistics.pstdev(loads) / statistics.mean(loads)


def ours(keys: list[bytes]) -> dict[str, float]:
    rings: dict[int, Ring] = {}
    build_s = 0.0
    for n in (10, 11, 100):
        started = time.perf_counter()
        rings[n] = Ring(names(n))
        build_s = max(build_s, time.perf_counter() - started)
    partition_of = rings[10].partition_of
    per_partition = Counter(partition_of(key) for key in keys)

    def loads(ring: Ring) -> list[int]:
        by_node = dict.fromkeys(ring.members, 0)
        for partition, count in per_partition.items():
            by_node[ring.primary(partition)] += count
        return list(by_node.values())

    moved = sum(count for partition, count in per_partition.items()
                if rings[10].primary(partition) != rings[11].primary(partition))
    return {"stdev_pct_n10": spread_pct(loads(rings[10])),
            "stdev_pct_n100": spread_pct(loads(rings[100])),
            "moved_over_ideal": moved / (len(keys) / 11), "build_s_n100": build_s}


def reference(keys: list[bytes]) -> dict[str, float]:
    lookups: dict[int, Callable[[bytes], str]] = {}
    for n in (10, 11, 100):
        lookups[n] = HashRing(nodes=names(n)).get_node
    owners10 = [lookups[10](key) for key in keys]
    owners11 = [lookups[11](key) for key in keys]
    owners100 = [lookups[100](key) for key in keys]
    moved = sum(1 for a, b in zip(owners10, owners11, strict=True) if a != b)
    return {"uhashring_stdev_pct_n10": spread_pct(list(Counter(owners10).values())),
            "uhashring_stdev_pct_n100": spread_pct(list(Counter(owners100).values())),
            "uhashring_moved_over_ideal": moved / (len(keys) / 11)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys placed on the rings")
    args = parser.parse_args()
    keys = [b"user:%010d" % i for i in range(args.keys)]
    figures = ours(keys) | reference(keys)
    figures["ratio_stdev_n10"] = figures["stdev_pct_n10"] / figures["uhashring_stdev_pct_n10"]
    figures["ratio_stdev_n100"] = figures["stdev_pct_n100"] / figures["uhashring_stdev_pct_n100"]
    figures["ratio_moved"] = figures["moved_over_ideal"] / figures["uhashring_moved_over_ideal"]
    figures["ratio"] = max(figures["ratio_stdev_n10"], figures["ratio_stdev_n100"],
                           figures["ratio_moved"])
    report = {"bench": "ring", "keys": args.keys} | {k: round(v, 4) for k, v in figures.items()}
    print(json.dumps(report, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
