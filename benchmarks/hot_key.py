# Benchmark: the replica's apply path (kv/writes.py Writes.apply_and_replicate -> the group
# commit, kv/writer.py -> shard/store.py plan_updates) on one in-process node (its Network on
# 127.0.0.1, a real LevelDB dir, one replica, consistency ONE: no replication in the figures).
# Prints one JSON line.
#   hot_ms_per_op      --hot-ops sadd ops of one new member each on one key holding a set of
#                      --members members (about 70 bytes each: 700 KB for 10,000), all in one
#                      execute_many (one batch of the group commit, as a kv-ops request is);
#                      hot_ideal_ms: the reference, one crdt.decode plus one crdt.encode of
#                      that state (the least a batch of ops on the key must spend);
#                      hot_ratio = the whole batch / the reference.
#   distinct_ops_per_s --rounds execute_many calls of --batch puts on distinct keys each (the
#                      normal write path); distinct_ideal_per_s: the reference, the same
#                      number of fresh register deltas merged by Store.apply_deltas on a store
#                      of its own (one synced batch each), measured in the same run;
#                      distinct_ratio = ours / the reference; distinct_cpu_us_per_op: the
#                      process's CPU per op (all threads), the median over the calls (less
#                      noisy than the rate on a shared machine: the fsync waits are not in it).
# Must not live here: anything the write path does (kv/ provides it).
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio  # noqa: E402
from _common import median, quiet_libraries, ratio, report  # noqa: E402

import crdt  # noqa: E402
from kv import KV, Consistency, KVConfig  # noqa: E402
from kv.ops import Op  # noqa: E402
from p2p import Network, NetworkConfig  # noqa: E402
from shard.store import Store  # noqa: E402

MEMBER = "member-{:06d}"  # about 70 bytes a member once stored with its dot


async def measure(base: Path, args: argparse.Namespace) -> dict[str, float | int]:
    config = NetworkConfig(data_dir=base / "node", network_id="bench-hot-key")
    async with (Network.start(config) as net,
                KV.start(net, base / "node", KVConfig(replicas=1)) as kv):
        one = Consistency.ONE
        await kv.sadd("hot", *(MEMBER.format(i) for i in range(args.members)), consistency=one)
        stored = kv.store.get(b"hot")
        assert stored is not None
        ops = [Op("sadd", b"hot", (f"new-{i}",)) for i in range(args.hot_ops)]
        started = time.perf_counter()
        await kv.execute_many(ops, one)
        hot_s = time.perf_counter() - started
        assert len(await kv.get("hot", one)) == args.members + args.hot_ops

        distinct_s = 0.0
        cpu: list[float] = []
        for r in range(args.rounds):
            batch = [Op("put", b"k-%d-%d" % (r, i), (i,)) for i in range(args.batch)]
            started, started_cpu = time.perf_counter(), time.process_time()
            await kv.execute_many(batch, one)
            distinct_s += time.perf_counter() - started
            cpu.append(time.process_time() - started_cpu)

    started = time.perf_counter()
    crdt.encode(crdt.decode(stored))
    ideal_s = time.perf_counter() - started
    with Store(base / "reference", crdt.merge_encoded) as store:
        clock = crdt.HLC()
        ideal_distinct_s = 0.0
        for r in range(args.rounds):
            deltas = [(b"k-%d-%d" % (r, i),
                       crdt.encode(crdt.new("lww").assign(i, clock.now(1), "bench")))
                      for i in range(args.batch)]
            started = time.perf_counter()
            store.apply_deltas(deltas, sync=True)
            ideal_distinct_s += time.perf_counter() - started
    done = args.rounds * args.batch
    return {"members": args.members, "state_bytes": len(stored), "hot_ops": args.hot_ops,
            "hot_s": round(hot_s, 3), "hot_ms_per_op": round(hot_s * 1000 / args.hot_ops, 3),
            "hot_ideal_ms": round(ideal_s * 1000, 3), "hot_ratio": ratio(hot_s, ideal_s),
            "distinct_ops": done, "distinct_ops_per_s": round(done / distinct_s),
            "distinct_cpu_us_per_op": round(median(cpu) * 1e6 / args.batch, 2),
            "distinct_ideal_per_s": round(done / ideal_distinct_s),
            "distinct_ratio": ratio(ideal_distinct_s, distinct_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description="the replica's apply path: a hot key and "
                                                 "distinct keys")
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--hot-ops", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    args = parser.parse_args()
    if args.quick:
        args.members, args.hot_ops, args.rounds, args.batch = 200, 20, 2, 50
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="tasknet-bench-hot-key-") as tmp:
        figures = trio.run(measure, Path(tmp), args)
    report({"benchmark": "kv_hot_key", **figures})


if __name__ == "__main__":
    main()
