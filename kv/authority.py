# Who may ask what of this node's store: admission of this node itself, and the checks of
# incoming requests before any handler runs or stores anything.
# Lives here: NotAdmitted for a node the network's rule does not admit, serving ring members
# only (and nobody once the store is closing), and the write authority over a replication
# batch (which keys and hints a sender may leave here).
# Must not live here: the admission rule itself (p2p/), opening and merging batches
# (kv/writes.py), the ring (kv/placement.py).
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from p2p import Network
from p2p.rpc import HandlerError

from .config import NotAdmitted
from .ops import shown_key
from .placement import Placement

log = logging.getLogger(__name__)

Handler = Callable[[str, Any], Awaitable[Any]]


class Authority:
    def __init__(self, net: Network, placement: Placement, metrics: dict[str, int]) -> None:
        self.net = net
        self.placement = placement
        self.metrics = metrics
        # set by KV.start as the store begins to close: requests are answered `unavailable`
        # (a fault of this node, nobody blamed) instead of reaching a closed store
        self.closing = False

    def check_admitted(self) -> None:
        """NotAdmitted unless the network's admission rule admits this node."""
        admission = self.net.admission
        if admission.rule.closed and not admission.admits_self():
            why = ("no reading of the stakes off the chain yet" if not admission.settled
                   else f"the rule asks for {admission.rule.describe()}")
            raise NotAdmitted(f"this node is not admitted to the network ({why}): it neither "
                              f"reads nor writes the store")

    def members_only(self, protocol: str, handler: Handler) -> Handler:
        """Wrap a handler of the store's protocols: only ring members are served. A peer
        the admission rule admits but this node's ring does not hold yet (it joined a moment
        ago) is refused without blame; anyone else is refused and scored down. Once the store
        is closing, every request is answered `unavailable`."""
        async def guarded(peer: str, message: Any) -> Any:
            if self.closing:
                raise HandlerError("unavailable", "this node's store is closing")
            if peer not in self.placement.ring.members:
                if self.net.admits(peer):
                    self.metrics["not_member_refused"] += 1
                    raise HandlerError("not_member", "not (yet) a member of this node's ring")
                self.net.refuse_unadmitted(peer, protocol)
                raise HandlerError("not_admitted", "the network's admission rule does not "
                                   "admit this peer")
            return await handler(peer, message)
        return guarded

    def check_batch(self, peer: str, direct: Sequence[tuple[bytes, object]],
                    hinted: dict[str, list[tuple[bytes, bytes]]]) -> None:
        """Write authority over a replication batch from ring member `peer`: each key it
        sends for this node to store must be replicated by the sender or by this node (an
        owner hands off to a newcomer, a fallback delivers the hints it held, and rings that
        differ for a moment still agree on one of the two); a hint it leaves here must be
        for a ring member that replicates the key, from a replica of that key. Anything else
        is refused whole: the sender keeps the batch as hints and retries, so a ring that
        lagged here loses nothing."""
        ring, me = self.placement.ring, self.placement.me
        for key, _ in direct:
            owners = ring.preference_list(key)
            if peer not in owners and me not in owners:
                self._refuse(peer, f"key {shown_key(key)} is replicated by neither "
                                   f"the sender nor this node")
        for target, items in hinted.items():
            if target not in ring.members:
                self._refuse(peer, f"a hint for {target}, not a ring member")
            for key, _ in items:
                owners = ring.preference_list(key)
                if target not in owners or peer not in owners:
                    self._refuse(peer, f"a hint of key {shown_key(key)} for {target} "
                                       f"from a node that does not replicate it")

    def _refuse(self, peer: str, why: str) -> None:
        self.metrics["authority_refused"] += 1
        self.metrics["refused_batches"] += 1
        log.info("refused a replication batch from %s: %s", peer, why)
        raise HandlerError("authority", why)
