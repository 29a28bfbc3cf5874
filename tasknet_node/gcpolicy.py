# The node process's policy for CPython's cyclic garbage collector, and the figures operators
# see of it (/status "gc", /metrics tasknet_gc_*).
# Lives here: freezing what startup built, the young-generation threshold, and the pause
# counters. Must not live here: anything else about running a node (runner.py).
#
# Why: a full collection walks every tracked object, and a started node (libp2p, multiaddr
# tables, the ring, the modules) holds about 100,000 of them. Under load the collector ran
# such a pass every few seconds, each one stopping the node for 50-150 ms on the shared
# cores, about a tenth of the node's CPU and the tail of its replication lag
# (benchmarks/cluster.py, README "Benchmarks"). Frozen, those objects are never walked again;
# what the node builds afterwards is still collected as usual.
from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from typing import Any

from .api import Metric

# Objects allocated (less freed) before a young collection; CPython's default is 700. A node
# allocates a few per message, and nearly all die by reference count, so collecting young
# objects that often mostly walks what is about to be freed anyway.
YOUNG_THRESHOLD = 10_000
OLDER_THRESHOLDS = (10, 10)


def freeze_startup_objects() -> None:
    """Collect once, then move every object that survived into the permanent generation (the
    collector never walks it again) and set the thresholds (/status "gc" shows how many were
    frozen). Call once, after startup: objects frozen that later become cyclic garbage are
    never reclaimed, so this must not run repeatedly."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *OLDER_THRESHOLDS)


class GcWatch:
    """Counts collections per generation and their pauses, from `gc.callbacks`."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._started = 0.0
        self.collections = [0, 0, 0]
        self.pause_s = [0.0, 0.0, 0.0]
        self.longest_pause_s = [0.0, 0.0, 0.0]

    def __enter__(self) -> GcWatch:
        gc.callbacks.append(self._on_collection)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._on_collection)

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = self._clock()
            return
        generation = info["generation"]
        pause = self._clock() - self._started
        self.collections[generation] += 1
        self.pause_s[generation] += pause
        self.longest_pause_s[generation] = max(self.longest_pause_s[generation], pause)

    def status(self) -> dict[str, Any]:
        return {"collections": list(self.collections),
                "pause_ms": [round(s * 1000, 1) for s in self.pause_s],
                "longest_pause_ms": [round(s * 1000, 1) for s in self.longest_pause_s],
                "frozen_objects": gc.get_freeze_count(),
                "thresholds": list(gc.get_threshold())}

    def metrics(self) -> Iterable[Metric]:
        for generation in range(3):
            labels = (("generation", str(generation)),)
            yield Metric("gc_collections", self.collections[generation], "counter",
                         "cyclic garbage collections", labels)
            yield Metric("gc_pause_seconds", self.pause_s[generation], "counter",
                         "time the process stood still in cyclic garbage collections", labels)
