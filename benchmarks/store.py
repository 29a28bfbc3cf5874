# Benchmark: shard.store's batched merge path (get, crdt.merge_encoded, group-committed put, hash
# tree update) against raw plyvel get + put of the same keys and values, measured in the same run.
# Both sides hold the same keys (stored-key layout) and the same encoded G-counter states, open
# LevelDB with the same options, write one synced batch per `--batch` keys, and run alternately,
# batch by batch, so that background compaction and cache state hit both alike.
# Figures: merges_per_s, raw_per_s, ratio = merges / raw; merge_fn_per_s = crdt.merge_encoded
# alone on the same inputs (the CRDT's share of the cost); load_per_s; reopen_s (tree rebuild).
# Must not live here: store logic (shard.store) or CRDT logic (crdt).
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plyvel  # noqa: E402

import crdt  # noqa: E402
from shard.store import LEVELDB_OPTIONS, Store  # noqa: E402

ACTORS = [f"node-{i}" for i in range(5)]
LOAD_BATCH = 10_000


def initial_state(i: int) -> bytes:
    counter = crdt.GCounter({ACTORS[i % 5]: 1 + i % 97, ACTORS[(i + 1) % 5]: 1 + i % 13})
    return crdt.encode(counter)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--merges", type=int, default=300_000, help="deltas merged in total")
    parser.add_argument("--batch", type=int, default=1_000, help="keys per synced batch")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    keys = [b"user:%010d" % i for i in range(args.keys)]
    states = [initial_state(i) for i in range(args.keys)]

    with tempfile.TemporaryDirectory(prefix="tasknet-bench-store-") as tmp:
        store = Store(Path(tmp) / "store", crdt.merge_encoded)
        started = time.perf_counter()
        for first in range(0, args.keys, LOAD_BATCH):
            store.apply_deltas(zip(keys[first:first + LOAD_BATCH],
                                   states[first:first + LOAD_BATCH], strict=True), sync=False)
        load_s = time.perf_counter() - started
        store.close()
        started = time.perf_counter()
        store = Store(Path(tmp) / "store", crdt.merge_encoded)
        reopen_s = time.perf_counter() - started

        raw = plyvel.DB(str(Path(tmp) / "raw"), create_if_missing=True, **LEVELDB_OPTIONS)
        stored_keys = [store.keyspace.prefix(key) + key for key in keys]
        for first in range(0, args.keys, LOAD_BATCH):
            with raw.write_batch() as batch:
                for i in range(first, min(first + LOAD_BATCH, args.keys)):
                    batch.put(stored_keys[i], states[i])

        rounds = max(1, args.merges // args.batch)
        merge_s = raw_s = 0.0
        merge_inputs: list[tuple[bytes, bytes]] = []
        for _ in range(rounds):
            picks = [rng.randrange(args.keys) for _ in range(args.batch)]
            deltas = [(keys[i], crdt.encode(crdt.GCounter({rng.choice(ACTORS): 1000 + r})))
                      for r, i in enumerate(picks)]
            raw_picks = [stored_keys[rng.randrange(args.keys)] for _ in range(args.batch)]

            started = time.perf_counter()
            with raw.write_batch(sync=True) as batch:
                get = raw.get
                for stored in raw_picks:
                    batch.put(stored, get(stored))
            raw_s += time.perf_counter() - started

            started = time.perf_counter()
            results = store.apply_deltas(deltas, sync=True)
            merge_s += time.perf_counter() - started
            merge_inputs.extend(zip((states[i] for i in picks), (d for _, d in deltas),
                                    strict=True))
            assert len(results) == len(deltas)

        started = time.perf_counter()
        for old, delta in merge_inputs:
            crdt.merge_encoded(old, delta)
        merge_fn_s = time.perf_counter() - started
        raw.close()
        store.close()

    done = rounds * args.batch
    figures = {"bench": "store", "keys": args.keys, "merges": done, "batch": args.batch,
               "value": "crdt.GCounter", "merge": "crdt.merge_encoded",
               "merges_per_s": round(done / merge_s), "raw_per_s": round(done / raw_s),
               "ratio": round(raw_s / merge_s, 3),
               "merge_fn_per_s": round(len(merge_inputs) / merge_fn_s),
               "load_per_s": round(args.keys / load_s), "reopen_s": round(reopen_s, 3)}
    print(json.dumps(figures, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
