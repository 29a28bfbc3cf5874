"""Cost of one KV op over many set members, against encoding the resulting state once.

One sadd, srem or delete runs in one step of a node's event loop, so its cost must grow
linearly with its members (it was quadratic: 10,000 members took 47 s). Per size n: the
work a replica does for one op on a key holding n members (decode the stored state,
check_op, make_delta, encode the delta, check_growth, merge it into the stored state):
`sadd_s` adding n new members, `srem_s` removing n, `delete_s` deleting the whole key. The
"ideal" reference, measured in the same run: one crdt.encode of the state the sadd leaves
(2n members), the least any implementation must spend to produce those bytes. `ratio` per
size = sadd_s / ideal_s; the headline `ratio` is the worst size's, and `linearity` is the
per-member cost of the sadd at the largest size over that at the smallest (about 1 when
linear, about largest/smallest when quadratic). Prints one JSON line.
Usage: python benchmarks/bulk_ops.py [--quick | --sizes 1000,4000,10000]
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import ratio, report  # noqa: E402

import crdt  # noqa: E402
from kv.ops import (  # noqa: E402
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    Op,
    check_growth,
    check_op,
    make_delta,
)

ACTOR = "12D3KooWQf3Uoj8FzvF6Kd6y5ZdZjTjjc4JrFKTm2pPdmSqBU3qk"  # as long as a peer id
NOW_MS = 1_700_000_000_000
MAX_ITEM_BYTES = 64 * 1024 * 1024  # no growth limit in the way of the largest size


def apply(op: Op, stored: bytes | None) -> bytes:
    """What a replica does for one op on the key holding `stored`; the state it leaves."""
    check_op(op, MAX_KEY_BYTES, MAX_VALUE_BYTES)
    state = crdt.decode(stored) if stored is not None else None
    delta = make_delta(op, state, ACTOR, crdt.HLC(), NOW_MS)
    assert delta is not None
    encoded = crdt.encode(delta)
    check_growth(op, stored, encoded, MAX_ITEM_BYTES)
    return encoded if stored is None else crdt.merge_encoded(stored, encoded)


def best(fn: Callable[[], object], repeats: int) -> float:
    """Best seconds of `repeats` calls (the machine is shared: best is stablest)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(n: int, repeats: int) -> dict[str, float | int]:
    held = tuple(f"held-{i}" for i in range(n))
    added = tuple(f"added-{i}" for i in range(n))
    stored = apply(Op("sadd", b"k", held), None)
    after = apply(Op("sadd", b"k", added), stored)
    final = crdt.decode(after)
    assert len(final) == 2 * n
    sadd = best(lambda: apply(Op("sadd", b"k", added), stored), repeats)
    srem = best(lambda: apply(Op("srem", b"k", held), stored), repeats)
    delete = best(lambda: apply(Op("delete", b"k"), stored), repeats)
    ideal = best(lambda: crdt.encode(final), repeats)
    return {"members": n, "state_bytes": len(after), "sadd_s": round(sadd, 7),
            "srem_s": round(srem, 7), "delete_s": round(delete, 7),
            "ideal_encode_s": round(ideal, 7), "ratio": ratio(sadd, ideal)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,4000,10000",
                        help="members per op, comma-separated (at most 10,000: the cap)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    args = parser.parse_args()
    sizes, repeats = ([50, 200], 1) if args.quick else (
        [int(s) for s in args.sizes.split(",")], args.repeats)
    results = [measure(n, repeats) for n in sizes]
    first, last = results[0], results[-1]
    per_member = [float(r["sadd_s"]) / int(r["members"]) for r in (first, last)]
    report({
        "benchmark": "kv_bulk_ops",
        "repeats": repeats,
        "sizes": results,
        "linearity": round(per_member[1] / per_member[0], 3) if per_member[0] > 0 else 0.0,
        "ratio": max(float(r["ratio"]) for r in results),
    })


if __name__ == "__main__":
    main()
