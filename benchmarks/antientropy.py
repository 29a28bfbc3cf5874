# Benchmark: anti-entropy between two shard.store replicas of `--keys` keys that differ in d keys
# (d = 1, 100, 10000; capped at keys / 2 for small runs), against the reference of sending the
# full state (every key and state, msgpack-framed).
# Each exchange runs both state machines in this process and carries every message through
# msgpack; bytes_dN counts those bytes, seconds_dN the wall time of the whole exchange (both
# sides' work). The exchange must find exactly the d keys; after merging what each side received
# the two trees must be equal (both are checked, so a wrong figure cannot pass silently).
# ratio = bytes_d1 / full_state_bytes. build_s = loading one store; reopen_s = opening it after a
# clean close (tree from the snapshot); rebuild_s = rebuilding its tree by a full scan (what an
# open after a crash does).
# Must not live here: exchange or store logic (shard provides them).
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack  # noqa: E402

import crdt  # noqa: E402
from shard.antientropy import Initiator, Responder  # noqa: E402
from shard.store import Store  # noqa: E402

ACTORS = [f"node-{i}" for i in range(5)]
LOAD_BATCH = 10_000


def counter(i: int) -> bytes:
    return crdt.encode(crdt.GCounter({ACTORS[i % 5]: 1 + i % 97, ACTORS[(i + 1) % 5]: 1 + i % 13}))


def diverge(left: Store, right: Store, keys: int, d: int, rng: random.Random) -> set[bytes]:
    """Make the stores differ in exactly d keys: changed on one side or the other, or new."""
    differing = set()
    for n, i in enumerate(rng.sample(range(keys), d)):
        side = left if n % 2 == 0 else right
        if n % 3 == 2:
            key = b"new:%d:%010d" % (d, i)
            side.put_state(key, counter(i), sync=False)
        else:
            key = b"user:%010d" % i
            # Above every count of earlier rounds, so the delta always changes the state.
            raised = crdt.GCounter({ACTORS[n % 5]: 100_000 * d + n})
            side.apply_deltas([(key, crdt.encode(raised))], sync=False)
        differing.add(key)
    return differing


def exchange(left: Store, right: Store) -> tuple[int, int, float, Initiator, Responder]:
    started = time.perf_counter()
    initiator = Initiator(left.tree, left.read_segment)
    responder = Responder(right.tree, right.read_segment)
    message: dict[str, Any] | None = initiator.start()
    sides: list[Initiator | Responder] = [responder, initiator]
    count = size = 0
    while message is not None:
        wire = msgpack.packb(message)
        count, size = count + 1, size + len(wire)
        message = sides[0].receive(msgpack.unpackb(wire))
        sides.reverse()
    return count, size, time.perf_counter() - started, initiator, responder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    figures: dict[str, object] = {"bench": "antientropy", "keys": args.keys}

    with tempfile.TemporaryDirectory(prefix="tasknet-bench-ae-") as tmp:
        started = time.perf_counter()
        with Store(Path(tmp) / "left", crdt.merge_encoded) as left:
            for first in range(0, args.keys, LOAD_BATCH):
                stop = min(first + LOAD_BATCH, args.keys)
                left.put_states(((b"user:%010d" % i, counter(i)) for i in range(first, stop)),
                                sync=False)
            full_state_bytes = sum(len(msgpack.packb([key, state]))
                                   for p in range(left.keyspace.partitions)
                                   for key, state in left.iterate(p))
        figures["build_s"] = round(time.perf_counter() - started, 3)
        figures["full_state_bytes"] = full_state_bytes
        shutil.copytree(Path(tmp) / "left", Path(tmp) / "right")
        started = time.perf_counter()
        left = Store(Path(tmp) / "left", crdt.merge_encoded)
        figures["reopen_s"] = round(time.perf_counter() - started, 3)
        started = time.perf_counter()
        left.rebuild_tree()
        figures["rebuild_s"] = round(time.perf_counter() - started, 3)
        right = Store(Path(tmp) / "right", crdt.merge_encoded)
        try:
            assert left.tree == right.tree
            used = []
            for d in (1, 100, 10_000):
                actual = min(d, args.keys // 2)
                used.append(actual)
                differing = diverge(left, right, args.keys, actual, rng)
                count, size, seconds, initiator, responder = exchange(left, right)
                found = {key for key, _ in initiator.received} | {
                    key for key, _ in responder.received}
                assert found == differing, f"d={actual}: found {len(found)} keys"
                left.apply_deltas(initiator.received)
                right.apply_deltas(responder.received)
                assert left.tree == right.tree, f"d={actual}: replicas still differ"
                figures[f"bytes_d{d}"] = size
                if d == 1:
                    bytes_d1 = size
                figures[f"seconds_d{d}"] = round(seconds, 4)
                figures[f"messages_d{d}"] = count
            figures["diffs"] = used
        finally:
            left.close()
            right.close()
    figures["ratio"] = round(bytes_d1 / full_state_bytes, 8)
    print(json.dumps(figures, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
