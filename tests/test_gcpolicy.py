# The node's garbage-collector figures (tasknet_node/gcpolicy.py), on the real collector.
# (The freeze itself is checked on a running node process in test_node_process.py: freezing
# the test process would change the collector for every test after this one.)
import gc

from tasknet_node.gcpolicy import GcWatch


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_watch_counts_full_collections_and_their_pauses_until_it_is_closed():
    with GcWatch() as watch:
        before = list(watch.collections)
        _Cycle()
        gc.collect()
        assert watch.collections[2] == before[2] + 1
        assert watch.pause_s[2] > 0 and watch.longest_pause_s[2] <= watch.pause_s[2]
        status = watch.status()
        assert status["collections"] == watch.collections
        assert status["thresholds"] == list(gc.get_threshold())
        samples = {(m.name, m.labels): m.value for m in watch.metrics()}
        assert samples[("gc_collections", (("generation", "2"),))] == watch.collections[2]
    seen = watch.collections[2]
    gc.collect()
    assert watch.collections[2] == seen
