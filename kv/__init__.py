# tasknet's replicated key-value store (`node.kv`): see service.KV.
from .ops import OpError
from .service import KV, Consistency, KVConfig, QuorumError

__all__ = ["KV", "Consistency", "KVConfig", "OpError", "QuorumError"]
