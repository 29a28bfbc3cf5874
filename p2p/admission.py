# Admission: which peers a network lets hold data, serve replicas and take part in
# membership. Lives here (sans-IO): the rule a network declares (`AdmissionRule`: open,
# allowlist, stake) with its validation, and the `Admission` gate that answers "is this peer
# admitted?" from the rule and, for the stake rule, from the stakes last read off the chain
# (the node feeds them in; nothing here talks to a chain or reads a clock).
# Must not live here: enforcement (p2p/network.py refuses requests and membership records,
# kv/ refuses writes and reads), reading the chain (tasknet_node/admission_check.py).
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OPEN = "open"
ALLOWLIST = "allowlist"
STAKE = "stake"
RULES = (OPEN, ALLOWLIST, STAKE)

# who may publish gossip that this node accepts and relays
GOSSIP_ALL = "all"  # anyone connected (the open rule's only policy)
GOSSIP_MEMBERS = "members"  # admitted peers only; others are kept out of the pubsub mesh
GOSSIP_POLICIES = (GOSSIP_ALL, GOSSIP_MEMBERS)

_PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{40,60}$")  # base58btc, an Ed25519 peer id


class AdmissionError(ValueError):
    """An admission rule is invalid (unknown kind, a bad peer id, a missing setting)."""


@dataclass(frozen=True)
class AdmissionRule:
    """What a network requires of a peer before it holds data or takes part in membership.

    - `open`: every peer that completes Noise (a local development network);
    - `allowlist`: the peer ids in `peers`;
    - `stake`: peers whose node holds at least `min_stake` on task `task` of the network's
      chain (re-read every `recheck_s` seconds; the chain's account -> node binding decides
      which peer an account is).
    `gossip` says whether non-admitted peers' gossip is accepted ("all") or whether they are
    kept out of the pubsub mesh altogether ("members", the default for the closed rules).
    """

    kind: str = OPEN
    peers: frozenset[str] = frozenset()
    min_stake: int = 0
    task: str | None = None
    gossip: str = ""
    recheck_s: float = 30.0

    def __post_init__(self) -> None:
        if self.kind not in RULES:
            raise AdmissionError(f"admission rule must be one of {', '.join(RULES)}, "
                                 f"not {self.kind!r}")
        if not self.gossip:
            object.__setattr__(self, "gossip", GOSSIP_ALL if self.kind == OPEN
                               else GOSSIP_MEMBERS)
        if self.gossip not in GOSSIP_POLICIES:
            raise AdmissionError(f"admission gossip policy must be one of "
                                 f"{', '.join(GOSSIP_POLICIES)}, not {self.gossip!r}")
        for peer in self.peers:
            if not isinstance(peer, str) or not _PEER_ID.match(peer):
                raise AdmissionError(f"not a peer id in the admission list: {peer!r}")
        if self.kind == ALLOWLIST and not self.peers:
            raise AdmissionError("the allowlist admission rule needs at least one peer id")
        if self.kind == STAKE:
            if type(self.min_stake) is not int or self.min_stake <= 0:
                raise AdmissionError("the stake admission rule needs min_stake, a whole "
                                     "number above 0")
            if not isinstance(self.task, str) or not self.task:
                raise AdmissionError("the stake admission rule needs the task whose stake "
                                     "counts")
        if not self.recheck_s > 0:
            raise AdmissionError("admission recheck_s must be above 0")

    @property
    def closed(self) -> bool:
        return self.kind != OPEN

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> AdmissionRule:
        """The `[admission]` table of a testnet file: rule, peers, min_stake, task, gossip,
        recheck_s."""
        unknown = set(table) - {"rule", "peers", "min_stake", "task", "gossip", "recheck_s"}
        if unknown:
            raise AdmissionError(f"unknown admission keys {sorted(unknown)}")
        peers = table.get("peers", [])
        if not isinstance(peers, list):
            raise AdmissionError("admission peers must be a list of peer ids")
        recheck = table.get("recheck_s", 30.0)
        if isinstance(recheck, bool) or not isinstance(recheck, int | float):
            raise AdmissionError("admission recheck_s must be a number of seconds")
        return cls(kind=table.get("rule", OPEN), peers=frozenset(peers),
                   min_stake=table.get("min_stake", 0), task=table.get("task"),
                   gossip=table.get("gossip", ""), recheck_s=float(recheck))

    def describe(self) -> str:
        if self.kind == ALLOWLIST:
            return f"allowlist of {len(self.peers)} peers"
        if self.kind == STAKE:
            return f"stake of at least {self.min_stake} on task {self.task}"
        return "open"


@dataclass
class Admission:
    """The gate one node applies: `admits(peer)`. Under the stake rule it admits the peers
    of the last stake reading (`set_staked`), plus those of the reading before it for one
    recheck period, so that a peer whose stake was read a moment apart by two nodes is not
    refused by one and served by the other for longer than that. Until a first reading
    arrives, `settled` is False: callers refuse without blaming (scoring) the peer."""

    rule: AdmissionRule
    self_id: str
    _staked: frozenset[str] = field(default=frozenset())
    _previous: frozenset[str] = field(default=frozenset())
    settled: bool = field(init=False)

    def __post_init__(self) -> None:
        self.settled = self.rule.kind != STAKE

    def admits(self, peer: str) -> bool:
        rule = self.rule
        if rule.kind == OPEN:
            return True
        if rule.kind == ALLOWLIST:
            return peer in rule.peers
        return peer in self._staked or peer in self._previous

    def admits_self(self) -> bool:
        return self.admits(self.self_id)

    def set_staked(self, peers: Iterable[str]) -> bool:
        """A new stake reading (the peers whose stake meets the minimum); returns whether
        the admitted set changed."""
        staked = frozenset(peers)
        before = self._staked | self._previous
        self._previous, self._staked = self._staked, staked
        changed = self._staked | self._previous != before or not self.settled
        self.settled = True
        return changed

    def admitted_known(self) -> frozenset[str]:
        """The peers this gate names (allowlist, or the last stake reading); empty if open."""
        if self.rule.kind == ALLOWLIST:
            return self.rule.peers
        return self._staked | self._previous

    def status(self) -> dict[str, Any]:
        return {"rule": self.rule.kind, "describe": self.rule.describe(),
                "gossip": self.rule.gossip, "settled": self.settled,
                "self_admitted": self.admits_self(),
                "admitted_known": len(self.admitted_known())}
