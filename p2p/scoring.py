# Peer scores: how much we trust each peer, lowered by what it sent us that was bad.
# Lives here (sans-IO): penalties per offence, decay over time, the ban decision, and the
# forgetting of peers whose score has decayed back to about nothing (a peer met once, or an
# attacker with a fresh identity per connection, must not leave an entry for the life of the
# process).
# Must not live here: the enforcement (disconnecting, blacklisting), which the network does.
from __future__ import annotations

from dataclasses import dataclass, field

PENALTIES = {
    "malformed": 10.0,
    "oversized": 10.0,
    "forged": 50.0,
    "replayed": 2.0,
    "version": 5.0,
    "network": 5.0,
    "channel": 10.0,
    "unsigned": 20.0,
    "author": 50.0,
    "frame": 10.0,
    "stalled": 5.0,
    "unadmitted": 10.0,  # asked for a members-only service without being admitted
    "authority": 10.0,  # wrote keys it does not replicate, hints for non-members
    "flood": 2.0,  # more protocol requests than an honest peer sends (each one refused)
    "fault": 5.0,  # an error it provoked inside py-libp2p (contained, see libp2p_fixes)
}


PRUNE_FLOOR = 1024  # entries held before the first sweep of decayed scores


@dataclass
class PeerScores:
    """Scores of the peers that offended, decaying with `half_life_s`. A score that decayed
    to within `forget_within` of zero is forgotten (the next offence counts from zero, as for
    a peer never seen); at most `max_peers` scores are held: past that the mildest go first,
    so a peer near the ban line is never forgotten for others' offences. Banned peers stay
    until their ban ends."""

    ban_below: float = -100.0
    half_life_s: float = 60.0
    ban_seconds: float = 120.0
    forget_within: float = 1.0
    max_peers: int = 10_000
    _scores: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer -> (score, t)
    _banned_until: dict[str, float] = field(default_factory=dict)
    _prune_at: int = field(default=PRUNE_FLOOR, init=False)
    offences: dict[str, int] = field(default_factory=dict)

    def score(self, peer: str, now: float) -> float:
        value, at = self._scores.get(peer, (0.0, now))
        return value * 0.5 ** (max(0.0, now - at) / self.half_life_s)

    def penalize(self, peer: str, reason: str, now: float) -> bool:
        """Record an offence; returns True when the peer has just fallen below the ban line."""
        self.offences[reason] = self.offences.get(reason, 0) + 1
        value = self.score(peer, now) - PENALTIES.get(reason, 10.0)
        self._scores[peer] = (value, now)
        if len(self._scores) > min(self._prune_at, self.max_peers):
            self.prune(now)
        if value < self.ban_below and not self.is_banned(peer, now):
            self._banned_until[peer] = now + self.ban_seconds
            return True
        return False

    def is_banned(self, peer: str, now: float) -> bool:
        until = self._banned_until.get(peer)
        if until is None:
            return False
        if now >= until:
            self._end_ban(peer)
            return False
        return True

    def _end_ban(self, peer: str) -> None:
        """A ban that ran out goes with the score that earned it."""
        del self._banned_until[peer]
        self._scores.pop(peer, None)

    def prune(self, now: float) -> None:
        """Forget ended bans and scores that decayed to within `forget_within` of zero;
        past `max_peers` scores, the mildest of the peers not banned go too."""
        for peer in [p for p, until in self._banned_until.items() if now >= until]:
            self._end_ban(peer)
        kept = {peer: self.score(peer, now) for peer in self._scores}
        for peer, value in kept.items():
            if value > -self.forget_within and peer not in self._banned_until:
                del self._scores[peer]
        excess = len(self._scores) - self.max_peers
        if excess > 0:
            mildest = sorted((p for p in self._scores if p not in self._banned_until),
                             key=lambda p: kept[p], reverse=True)
            for peer in mildest[:excess]:
                del self._scores[peer]
        self._prune_at = max(PRUNE_FLOOR, 2 * len(self._scores))

    def snapshot(self, now: float) -> dict[str, float]:
        return {peer: round(self.score(peer, now), 2) for peer in self._scores}
