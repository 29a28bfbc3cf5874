# tasknet's replicated key-value store (`node.kv`): see service.KV.
from .ops import OpError
from .service import KV, Consistency, KVConfig, NotAdmitted, QuorumError

__all__ = ["KV", "Consistency", "KVConfig", "NotAdmitted", "OpError", "QuorumError"]
