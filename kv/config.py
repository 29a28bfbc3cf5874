# The store's settings and the errors its API raises: what a caller (the node runner, the
# CLI, an embedding program) needs to configure and call the store without loading it.
# Lives here: the consistency levels, KVConfig and its checks, QuorumError, OutcomeUnknown,
# NotAdmitted.
# Must not live here: anything that imports trio or p2p (the CLI imports this module to
# offer the consistency levels; kv/__init__.py loads the service only when asked for KV).
from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .ops import DELTA_OVERHEAD_BYTES, MAX_KEY_BYTES, MAX_VALUE_BYTES


class Consistency(StrEnum):
    ONE = "one"
    QUORUM = "quorum"
    ALL = "all"

    def needed(self, replicas: int) -> int:
        return {"one": 1, "quorum": replicas // 2 + 1, "all": replicas}[self.value]


class QuorumError(Exception):
    """Fewer replicas than the consistency level asks for answered in time."""


class OutcomeUnknown(QuorumError):
    """A write was sent to a replica that did not answer in time (paused, cut off, slow): it
    may or may not have been applied, and may still take effect later. Retrying is safe for
    put, sadd, srem, hset, hdel and a delete of a register, set or map; an incr retried may
    count twice (read the counter first). A QuorumError, so callers that treat every
    unacknowledged write alike need not know it."""

    code = "outcome_unknown"


class NotAdmitted(Exception):
    """The network's admission rule does not admit this node (yet): it neither coordinates
    reads and writes nor holds data, so that nothing it stored while outside the network
    flows in by handoff once it is admitted."""


@dataclass
class KVConfig:
    replicas: int = 3
    # 4096 partitions keep primary load within ~5% of the mean up to a few tens of nodes
    # while per-partition work (handoff scans, anti-entropy snapshots) stays cheap
    partitions: int = 4096
    write_consistency: Consistency = Consistency.QUORUM
    read_consistency: Consistency = Consistency.QUORUM
    request_timeout: float = 5.0
    # a forwarded write whose replica has left a request unanswered for this many seconds
    # goes to the key's next live replica too (hedged), for ops safe to apply twice (all but
    # incr; see kv/writes.py); the first good answer counts. None: never hedge
    hedge_after_s: float | None = 1.0
    # a replica that kept a forwarded write waiting past hedge_after_s is passed over as the
    # one that applies writes for this long, or until it answers or restarts
    slow_mark_s: float = 10.0
    hint_interval: float = 1.0
    anti_entropy_interval: float = 10.0
    # a round compares only partitions whose root held still this long before it (at most
    # half the interval), and puts off one that kept changing at most this many rounds in a
    # row with each peer (shard/quiet.py): writes in flight are push replication's to deliver
    anti_entropy_settle_s: float = 1.0
    anti_entropy_max_deferrals: int = 5
    rebalance_interval: float = 2.0
    max_batch: int = 512
    # replication, hint and handoff batches stay below this many bytes (frames are 4 MiB:
    # KV.start checks that a full batch fits one), and so does every key with the delta a
    # write makes of it or the state it leaves (larger: the write is refused as too_large)
    max_batch_bytes: int = 2 * 1024 * 1024
    # one operation's key, and its arguments (a value, members, a field) encoded, may not be
    # larger than these (too_large), wherever the op comes from
    max_key_bytes: int = MAX_KEY_BYTES
    max_value_bytes: int = MAX_VALUE_BYTES
    queue_per_peer: int = 20_000
    # the stored state the ops of one forwarded request (kv-ops) may apply to, summed over
    # its ops (each op reads and merges its key's whole state: an op on a 700 KB set touches
    # 700 KB). Ops beyond it are answered `busy`, not applied, and the coordinator sends them
    # again in its next request. 32 MiB keeps one request's work in the event loop to a few
    # hundred ms at most (about 45 ops on one 700 KB set, or 10,000 on keys of 3 KB)
    max_request_state_bytes: int = 32 * 1024 * 1024
    # a register tombstone is collected once its delete is this old and every replica holds
    # it or nothing; hints older than hint_ttl_s are dropped (anti-entropy repairs instead)
    tombstone_grace_s: float = 3600.0
    hint_ttl_s: float = 1800.0
    tombstone_sweep_interval: float = 10.0
    tombstone_scan_keys: int = 5000  # keys read per sweep round
    # the ring unchanged and every member alive this long before a sweep round may collect
    tombstone_settle_s: float = 60.0
    # no state from a peer may carry a wall time further ahead of this node's clock than
    # this (refused, counted in skew_refused, its sender scored down); local writes bound
    # the timestamps they observe by it too (kv/timebound.py)
    max_clock_skew_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_request_state_bytes <= 0:
            raise ValueError(f"max_request_state_bytes must be > 0, got "
                             f"{self.max_request_state_bytes}")
        if not self.max_clock_skew_s > 0:
            raise ValueError(f"max_clock_skew_s must be > 0, got {self.max_clock_skew_s}")
        if self.hedge_after_s is not None and not self.hedge_after_s > 0:
            raise ValueError(f"hedge_after_s must be > 0 or None, got {self.hedge_after_s}")
        if self.slow_mark_s < 0:
            raise ValueError(f"slow_mark_s must be >= 0, got {self.slow_mark_s}")
        if self.anti_entropy_settle_s < 0 or self.anti_entropy_max_deferrals < 0:
            raise ValueError("anti_entropy_settle_s and anti_entropy_max_deferrals must be >= 0")
        # a hint older than a collected tombstone's grace would bring the deleted key back
        if not 0 < self.hint_ttl_s <= self.tombstone_grace_s:
            raise ValueError(f"hint_ttl_s ({self.hint_ttl_s}) must be > 0 and <= "
                             f"tombstone_grace_s ({self.tombstone_grace_s})")
        # the largest write must make a delta that fits in a batch (and so in a frame)
        largest = self.max_key_bytes + self.max_value_bytes + DELTA_OVERHEAD_BYTES
        if largest > self.max_batch_bytes:
            # the node runner reports p2p's ConfigError as a configuration mistake; imported
            # here, on the error path only, so that loading this module loads no p2p
            from p2p import ConfigError
            raise ConfigError(f"max_key_bytes ({self.max_key_bytes}) + max_value_bytes "
                              f"({self.max_value_bytes}) + {DELTA_OVERHEAD_BYTES} bytes of "
                              f"CRDT overhead exceed max_batch_bytes ({self.max_batch_bytes}): "
                              "the largest write could not be replicated")
