# Membership view: who is in the network and in what state (alive, suspect, dead).
# Lives here (sans-IO): applying signed heartbeats that the network layer already verified,
# timeout-based failure detection driven by a `now` argument, and the events views emit.
# Must not live here: clocks, sockets, signatures (the caller verifies before observing).
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class MemberState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True)
class Member:
    peer_id: str
    addrs: tuple[str, ...]
    incarnation: int
    last_seen: float
    state: MemberState
    left: bool = False  # left the network for good (decommissioned), not just stopped
    interval: float = 0.0  # how often the member says it sends heartbeats (seconds)

    def to_dict(self, now: float) -> dict[str, object]:
        return {
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "incarnation": self.incarnation,
            "state": self.state.value,
            "last_seen_s_ago": round(max(0.0, now - self.last_seen), 3),
            "left": self.left,
        }


@dataclass(frozen=True)
class MemberEvent:
    """A change of one member: `previous` is None for a member seen for the first time;
    `current` is None for a member forgotten after being dead for long."""

    peer_id: str
    previous: MemberState | None
    current: MemberState | None
    member: Member
    restarted: bool = False


@dataclass
class MembershipConfig:
    """Silences that make a member suspect, then dead: at least these many seconds, and at
    least these many of the member's own heartbeat intervals (members slow their heartbeat
    down as the network grows)."""

    suspect_after: float = 3.0
    dead_after: float = 8.0
    forget_after: float = 300.0
    suspect_intervals: float = 3.0
    dead_intervals: float = 8.0


class MemberView:
    def __init__(self, self_id: str, config: MembershipConfig | None = None) -> None:
        self.self_id = self_id
        self.config = config or MembershipConfig()
        self._members: dict[str, Member] = {}

    def members(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: m.peer_id)

    def get(self, peer_id: str) -> Member | None:
        return self._members.get(peer_id)

    def alive_ids(self) -> set[str]:
        return {m.peer_id for m in self._members.values() if m.state is MemberState.ALIVE}

    def observe_heartbeat(
        self, peer_id: str, addrs: tuple[str, ...], incarnation: int, now: float,
        interval: float = 0.0,
    ) -> list[MemberEvent]:
        known = self._members.get(peer_id)
        if known is not None and incarnation < known.incarnation:
            return []  # a heartbeat from before the member's latest restart
        member = Member(peer_id, addrs, incarnation, now, MemberState.ALIVE,
                        interval=interval)
        self._members[peer_id] = member
        if known is None:
            return [MemberEvent(peer_id, None, MemberState.ALIVE, member)]
        restarted = incarnation > known.incarnation
        if known.state is not MemberState.ALIVE or restarted:
            return [MemberEvent(peer_id, known.state, MemberState.ALIVE, member, restarted)]
        return []

    def observe_leave(self, peer_id: str, incarnation: int, now: float,
                      permanent: bool = False) -> list[MemberEvent]:
        """A member said it stops (dead at once, back when it restarts) or, with
        `permanent`, that it leaves the network for good."""
        known = self._members.get(peer_id)
        if known is None or incarnation < known.incarnation or known.state is MemberState.DEAD:
            return []
        member = replace(
            known, state=MemberState.DEAD, last_seen=now, incarnation=incarnation,
            left=permanent
        )
        self._members[peer_id] = member
        return [MemberEvent(peer_id, known.state, MemberState.DEAD, member)]

    def tick(self, now: float) -> list[MemberEvent]:
        events: list[MemberEvent] = []
        cfg = self.config
        for peer_id, member in list(self._members.items()):
            silent = now - member.last_seen
            suspect_after = max(cfg.suspect_after, cfg.suspect_intervals * member.interval)
            dead_after = max(cfg.dead_after, cfg.dead_intervals * member.interval)
            if member.state is MemberState.ALIVE and silent >= suspect_after:
                new = replace(member, state=MemberState.SUSPECT)
            elif member.state is MemberState.SUSPECT and silent >= dead_after:
                new = replace(member, state=MemberState.DEAD)
            elif member.state is MemberState.DEAD and silent >= cfg.forget_after:
                del self._members[peer_id]
                events.append(MemberEvent(peer_id, MemberState.DEAD, None, member))
                continue
            else:
                continue
            self._members[peer_id] = new
            events.append(MemberEvent(peer_id, member.state, new.state, new))
        return events
