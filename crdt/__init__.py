# tasknet's CRDTs: pure, sans-IO delta-state CRDTs with a canonical msgpack encoding.
# No I/O, clocks, randomness or threads anywhere in this package: physical time is passed in.
"""Delta-state CRDTs (Almeida et al., "Delta State Replicated Data Types", 2018).

Types, by name for new(): "lww" LWWRegister, "mvreg" MVRegister, "gcounter" GCounter,
"pncounter" PNCounter, "orset" ORSet (add-wins, no tombstones), "ormap" ORMap (nested CRDTs).
Every state is immutable: mutators take the actor (replica id, a non-empty str) and return a
delta, itself a state of the same type; apply it with `state = state.merge(delta)` here and
ship `encode(delta)` to other replicas, which apply it with merge_encoded(stored, delta).

    s = ORSet()
    delta = s.add("node-1", "x")
    s = s.merge(delta)

Deletion markers a key-value store can rely on (a deleted thing never comes back when a
replica that missed the deletion merges its old state):
  * LWWRegister.delete(timestamp, actor): a tombstone write (`deleted` is True, value()
    None) that wins by timestamp like any write; keep the register, not nothing, for the key.
  * ORSet.remove / ORMap.remove / MVRegister.clear: the delta carries the causal context of
    the removed dots; the merged context keeps them from being re-added.
  * Counters cannot be deleted by themselves: put them in an ORMap and remove the key.

latest_wall(encoded) gives the latest wall time (ms) a state carries (its registers'
timestamps, nested ones included), for a receiver that bounds how far ahead of its own clock
a peer's state may be.
"""
from .codec import (
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_SIZE,
    TYPE_NAMES,
    State,
    decode,
    encode,
    merge_encoded,
    new,
    state_class,
)
from .errors import ClockDriftError, DecodeError
from .gcounter import GCounter
from .hlc import HLC, Timestamp
from .lww import LWWRegister
from .mvreg import MVRegister
from .ormap import ORMap
from .orset import ORSet
from .pncounter import PNCounter
from .walltime import latest_wall

__all__ = [
    "DEFAULT_MAX_DEPTH", "DEFAULT_MAX_SIZE", "HLC", "TYPE_NAMES", "ClockDriftError",
    "DecodeError", "GCounter", "LWWRegister", "MVRegister", "ORMap", "ORSet", "PNCounter",
    "State", "Timestamp", "decode", "encode", "latest_wall", "merge_encoded", "new",
    "state_class",
]
