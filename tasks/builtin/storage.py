# The storage-proof task: a node earns by proving, each round, that it holds the store
# partitions it replicates. The round's challenge (from chain data only: task id and round)
# picks up to K of the node's partitions; the submission lists a digest of each; auditors that
# replicate the same partitions recompute the digests and compare.
# Lives here: the challenge, the choice of partitions, the submission format and the audit.
# Must not live here: reading partition data (the node's StorageProver does it).
#
# Submission format: "p1:hex,p2:hex,..." (partition number, digest in hex), at most 512 bytes.
# Audit rules, in order:
# - malformed text, a repeated partition, more than K entries -> invalid; no entry at all is
#   invalid when the ring says the submitter replicates one of the auditor's partitions;
# - a partition the submitter does not replicate per the ring -> invalid;
# - for each listed partition the auditor also replicates, the auditor's digest must equal
#   the submitted one -> else invalid;
# - partitions the auditor does not replicate are skipped: if it shares none, it accepts
#   (it has nothing to check against; the assignment of auditors is not storage-aware).
# When: every replica digests the partitions at the start of the round (`task(round)`), for
# its own picks and for every other member's picks it also replicates, and keeps those digests
# for the submission and the audits. Replicas converge but differ by the writes in flight at
# any instant; digests taken when each side looks (seconds apart) made honest nodes disagree
# under a write load, digests taken at one agreed moment differ only by the writes still in
# flight at that moment (milliseconds of replication, plus the nodes' wake-up jitter).
# Limitations: the auditor checks that the listed partitions are the submitter's per the ring,
# not that they are the K the challenge picks; a node restarted within a round has no
# round-start digests for it: it submits live ones, and as an auditor it skips partitions it
# has no round-start digest of (no evidence either way).
from __future__ import annotations

import hashlib

from ..api import StorageProver, Task, TaskContext

K = 4  # partitions proven per round
MAX_DRAWS = 64 * K  # pick_partitions' bound on draws
DOMAIN = b"tasknet-storage"


def challenge_of(task_id: str, round: int) -> bytes:
    """sha256(b"tasknet-storage" || task_id || round as 8 bytes big-endian)."""
    return hashlib.sha256(DOMAIN + task_id.encode() + round.to_bytes(8, "big")).digest()


def pick_partitions(challenge: bytes, owned: list[int], k: int = K) -> list[int]:
    """`k` distinct partitions of `owned` (all of them when it has no more), ascending. Draw
    i is sha256(challenge || i as 4 bytes big-endian) as a big-endian integer modulo the
    number of distinct owned partitions, an index into them sorted; a repeat is drawn again.
    k hashes, not one per owned partition: a node owns thousands, and every node picks for
    every member each round."""
    distinct = sorted(set(owned))
    if len(distinct) <= k:
        return distinct
    chosen: set[int] = set()
    draw = 0
    # each draw is new with probability at least 2/(k+1): MAX_DRAWS is never reached in
    # practice; past it the smallest partitions not chosen fill up, as every node would
    while len(chosen) < k and draw < MAX_DRAWS:
        digest = hashlib.sha256(challenge + draw.to_bytes(4, "big")).digest()
        chosen.add(distinct[int.from_bytes(digest, "big") % len(distinct)])
        draw += 1
    for p in distinct:
        if len(chosen) >= k:
            break
        chosen.add(p)
    return sorted(chosen)


def format_submission(digests: dict[int, bytes]) -> str:
    return ",".join(f"{p}:{digests[p].hex()}" for p in sorted(digests))


def parse_submission(text: str) -> dict[int, bytes]:
    """The partition -> digest map of a submission; raises ValueError when malformed."""
    if text == "":
        return {}
    out: dict[int, bytes] = {}
    for item in text.split(","):
        p_text, sep, hex_text = item.partition(":")
        if not sep or not p_text.isdigit() or not hex_text:
            raise ValueError(f"malformed entry {item!r}")
        p = int(p_text)
        if p in out:
            raise ValueError(f"partition {p} listed twice")
        out[p] = bytes.fromhex(hex_text)
    return out


class StorageProof(Task):
    name = "storage"
    KEEP_ROUNDS = 4  # round-start digests kept: a round's are used in the next round

    def __init__(self, ctx: TaskContext) -> None:
        super().__init__(ctx)
        self._digests: dict[int, dict[int, bytes]] = {}  # round -> partition -> digest
        self._picks: dict[int, list[int]] = {}  # round -> this node's picks at its start

    def _prover(self) -> StorageProver:
        prover = self.ctx.storage
        if prover is None:
            raise RuntimeError("the storage task needs a node with a store (ctx.storage)")
        return prover

    async def task(self, round: int) -> None:
        """Digest, at the start of `round`, the partitions this round's proofs will need on
        this node: its own picks, and the picks of every other member that it replicates
        too (it may audit them)."""
        prover = self._prover()
        challenge = challenge_of(self.ctx.task_id, round)
        mine = set(prover.owned_partitions())
        picks = pick_partitions(challenge, sorted(mine))
        needed = set(picks)
        for member in prover.members():
            if member != self.ctx.node_id:
                needed |= set(pick_partitions(challenge, prover.partitions_of(member))) & mine
        self._picks[round] = picks
        self._digests[round] = {p: await prover.digest(p, challenge) for p in sorted(needed)}
        for old in [r for r in self._digests if r < round - self.KEEP_ROUNDS]:
            self._digests.pop(old, None)
            self._picks.pop(old, None)

    async def submission(self, round: int) -> str:
        prover = self._prover()
        challenge = challenge_of(self.ctx.task_id, round)
        picked = self._picks.get(round)
        kept = self._digests.get(round, {})
        if picked is None:  # restarted since the round began: live digests, the best it has
            picked = pick_partitions(challenge, prover.owned_partitions())
        digests = {p: kept[p] if p in kept else await prover.digest(p, challenge)
                   for p in picked}
        return format_submission(digests)

    async def audit(self, submission: str, round: int, submitter: str) -> bool:
        prover = self._prover()
        try:
            claimed = parse_submission(submission)
        except ValueError as e:
            self.ctx.log.info("storage audit: %s's submission is malformed: %s", submitter, e)
            return False
        mine = set(prover.owned_partitions())
        if len(claimed) > K:
            return False
        if not claimed:
            return not any(submitter in prover.replicas_of(p) for p in sorted(mine))
        kept = self._digests.get(round, {})
        for p in sorted(claimed):
            if submitter not in prover.replicas_of(p):
                self.ctx.log.info("storage audit: %s does not replicate %d", submitter, p)
                return False
            if p in kept and kept[p] != claimed[p]:
                self.ctx.log.info("storage audit: %s's digest of %d differs from ours at the "
                                  "start of round %d", submitter, p, round)
                return False
        return True
