# The node's garbage-collector figures (tasknet_node/gcpolicy.py), on the real collector.
# (The freeze itself is checked on a running node process in test_node_process.py: freezing
# the test process would change the collector for every test after this one.)
import gc
import itertools

from tasknet_node.gcpolicy import GcWatch

STEP_S = 0.25  # the fake clock advances this much per reading: every pause lasts exactly this


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _stepping_clock():
    readings = itertools.count()
    return lambda: next(readings) * STEP_S


def test_the_watch_counts_full_collections_and_their_pauses_until_it_is_closed():
    was_enabled = gc.isenabled()
    gc.disable()  # no automatic collection may interleave with the ones counted here
    try:
        with GcWatch(clock=_stepping_clock()) as watch:
            for _ in range(3):
                _Cycle()
                gc.collect()
            assert watch.collections == [0, 0, 3]
            assert watch.pause_s == [0.0, 0.0, 3 * STEP_S]
            assert watch.longest_pause_s == [0.0, 0.0, STEP_S]
            status = watch.status()
            assert status["collections"] == [0, 0, 3]
            assert status["pause_ms"] == [0.0, 0.0, 3 * STEP_S * 1000]
            assert status["thresholds"] == list(gc.get_threshold())
            samples = {(m.name, m.labels): m.value for m in watch.metrics()}
            assert samples[("gc_collections", (("generation", "2"),))] == 3
            assert samples[("gc_pause_seconds", (("generation", "2"),))] == 3 * STEP_S
            assert samples[("gc_collections", (("generation", "0"),))] == 0
        gc.collect()  # after close: not counted
        assert watch.collections == [0, 0, 3]
    finally:
        if was_enabled:
            gc.enable()
