# tasknet's sharded replica store: the ring (who owns what), the LevelDB store (what a node holds)
# and anti-entropy (how two replicas find and repair their differences).
# Must not live here: CRDT semantics (crdt/ passes its merge function in) or networking (p2p/).
from .antientropy import Initiator, ProtocolError, Responder
from .keyspace import Keyspace
from .merkle import HashTree, entry_hash
from .quiet import QuietPartitions
from .ring import OwnerChange, Ring, diff
from .store import CorruptRecord, Merge, OpenReport, Store, StoreError, StoreOpenError, open_leveldb

__all__ = [
    "CorruptRecord", "HashTree", "Initiator", "Keyspace", "Merge", "OwnerChange",
    "OpenReport", "ProtocolError", "QuietPartitions", "Responder", "Ring", "Store", "StoreError",
    "StoreOpenError", "diff", "entry_hash", "open_leveldb",
]
