# The stake admission rule's reading of the chain: every `recheck_s` seconds, which nodes
# hold at least the rule's minimum stake on its task, fed to the network's gate
# (p2p/admission.py). Lives here: that loop, driven by the task node once its chain is
# connected. Must not live here: the rule itself (p2p/admission.py) or its enforcement.
from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from chain.adapter import ChainAdapter, ChainError
from p2p import Network

log = logging.getLogger(__name__)


async def staked_nodes(chain: ChainAdapter, task_id: str, min_stake: int) -> set[str] | None:
    """Peer ids of the nodes whose account holds at least `min_stake` on `task_id` (an
    account counts only through a node binding the chain verified); None if the task is
    not on the chain."""
    view = await chain.task(task_id)
    if view is None:
        return None
    peers: set[str] = set()
    for account, stake in view.get("stakes", {}).items():
        if stake >= min_stake:
            peer = await chain.node_of(account)
            if peer is not None:
                peers.add(peer)
    return peers


async def keep_stake_admission(net: Network, chain: ChainAdapter,
                               say: Callable[[str], None] | None = None) -> None:
    """Re-read the stakes every recheck period for as long as the node runs; say whether
    this node is admitted after the first reading and whenever that changes (not every
    period: a node waiting for its stake would repeat it forever)."""
    rule = net.admission.rule
    assert rule.task is not None
    said_missing = False
    was_admitted: bool | None = None
    while True:
        try:
            peers = await staked_nodes(chain, rule.task, rule.min_stake)
        except (ChainError, OSError) as exc:
            log.warning("admission: cannot read stakes on task %s (%s); keeping the last "
                        "reading", rule.task, exc)
        else:
            if peers is None:
                if not said_missing:
                    log.warning("admission: task %s is not on the chain: no peer holds the "
                                "stake the network's rule asks for", rule.task)
                said_missing = True
                peers = set()
            else:
                said_missing = False
            net.set_staked(peers)
            admitted = net.admits(net.peer_id)
            if admitted != was_admitted:
                line = (f"admission: this node is admitted ({len(peers)} nodes hold the "
                        f"stake)" if admitted else
                        f"admission: this node holds less than {rule.min_stake} on task "
                        f"{rule.task}: the network does not admit it (it holds no data)")
                log.log(logging.INFO if admitted else logging.WARNING, "%s", line)
                if say is not None:
                    say(line)
            was_admitted = admitted
        await trio.sleep(rule.recheck_s)
