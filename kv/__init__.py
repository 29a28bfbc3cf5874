# tasknet's replicated key-value store (`node.kv`): see service.KV, and the map of its rooms
# in service.py's header. The settings and errors load without trio or p2p (the CLI imports
# them); KV loads the service on first use.
from typing import TYPE_CHECKING, Any

from .config import Consistency, KVConfig, NotAdmitted, OutcomeUnknown, QuorumError
from .ops import OpError

if TYPE_CHECKING:
    from .service import KV, LocalState

__all__ = ["KV", "Consistency", "KVConfig", "LocalState", "NotAdmitted", "OpError",
           "OutcomeUnknown", "QuorumError"]


def __getattr__(name: str) -> Any:
    if name in ("KV", "LocalState"):
        from . import service
        return getattr(service, name)
    raise AttributeError(f"module 'kv' has no attribute {name!r}")
