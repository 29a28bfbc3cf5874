# Benchmark: the group commit's hand-over of its synced write to a thread (kv/diskthread.py)
# against trio.to_thread.run_sync, the reference, measured in the same run.
# Each round makes --calls calls of one kind, then --calls of the other (rounds alternate, so
# the machine's noise hits both alike): a synced plyvel write of --keys small keys (what the
# group commit hands over under single writes), and an empty function (the hand-over alone).
# Figures per call, medians over --rounds rounds: *_cpu_us (the process's user + system CPU,
# every thread), *_wall_us; ratio = diskthread CPU / to_thread CPU for the synced write.
# Must not live here: the thread itself (kv/diskthread.py).
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import plyvel  # noqa: E402
import trio  # noqa: E402
from _common import finish, median, ratio  # noqa: E402

from kv.diskthread import DiskThread  # noqa: E402
from shard.store import LEVELDB_OPTIONS  # noqa: E402

Caller = Callable[..., Awaitable[Any]]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _per_call(call: Caller, fn: Callable[[], Any], calls: int) -> tuple[float, float]:
    """(CPU us, wall us) per call of `call(fn)`."""
    cpu, wall = _cpu_s(), time.perf_counter()
    for _ in range(calls):
        await call(fn)
    return ((_cpu_s() - cpu) * 1e6 / calls, (time.perf_counter() - wall) * 1e6 / calls)


async def run(args: argparse.Namespace, out: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="tasknet-bench-disk-") as tmp:
        db = plyvel.DB(tmp, create_if_missing=True, **LEVELDB_OPTIONS)
        counter = iter(range(1 << 62))
        value = b"v" * 130

        def synced_write() -> None:
            n = next(counter)
            with db.write_batch(sync=True) as batch:
                for i in range(args.keys):
                    batch.put(b"key:%d:%d" % (n, i), value)

        def nothing() -> None:
            return None

        kinds: dict[str, Callable[[], Any]] = {"write": synced_write, "noop": nothing}
        samples: dict[str, list[tuple[float, float]]] = {}
        try:
            with DiskThread() as disk:
                callers: dict[str, Caller] = {"to_thread": trio.to_thread.run_sync,
                                              "diskthread": disk.call}
                for caller in callers.values():  # warm up: threads started, caches filled
                    await _per_call(caller, synced_write, 20)
                for _ in range(args.rounds):
                    for kind, fn in kinds.items():
                        for name, caller in callers.items():
                            samples.setdefault(f"{name}_{kind}", []).append(
                                await _per_call(caller, fn, args.calls))
        finally:
            db.close()
    for label, values in samples.items():
        out[f"{label}_cpu_us"] = round(median([cpu for cpu, _ in values]), 1)
        out[f"{label}_wall_us"] = round(median([wall for _, wall in values]), 1)
    out["ratio"] = ratio(out["diskthread_write_cpu_us"], out["to_thread_write_cpu_us"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=500, help="calls per kind and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, default=10, help="keys per synced write")
    args = parser.parse_args(argv)
    out: dict[str, Any] = {"calls": args.calls, "rounds": args.rounds, "keys": args.keys}
    try:
        trio.run(run, args, out)
    except Exception as exc:
        return finish("diskthread", out, f"{type(exc).__name__}: {exc}")
    return finish("diskthread", out, None)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
