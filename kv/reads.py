# The read path: from a key to the merged state of R replicas, and the replica's side of it.
# Lives here: asking every live replica of the keys (one request per replica and 1024 keys),
# waiting until each key has R answers, merging them, read repair of replicas that answered
# stale (and, with an override, of those holding a state beyond the clock skew bound), and
# the handler of incoming reads (kv-read).
# Must not live here: which replicas a key has (kv/placement.py), how repairs are sent
# (kv/writes.py), background repair (kv/repair.py).
from __future__ import annotations

import logging
from typing import Any

import trio

import crdt
from p2p import Network, RequestError
from p2p.rpc import HandlerError
from shard import Store

from .authority import Authority
from .config import Consistency, KVConfig, QuorumError
from .ops import shown_key
from .placement import Placement
from .replication import Delta
from .timebound import TimeBound, wall_ms
from .writes import Writes

log = logging.getLogger(__name__)

READ_PROTOCOL = "kv-read"
READ_CHUNK = 1024  # keys per read request (the read handler's limit)


class Reads:
    """The read path of one KV node."""

    def __init__(self, net: Network, store: Store, placement: Placement, writes: Writes,
                 authority: Authority, config: KVConfig, metrics: dict[str, int],
                 timebound: TimeBound) -> None:
        self.net = net
        self.store = store
        self.placement = placement
        self.writes = writes
        self.authority = authority
        self.config = config
        self.metrics = metrics
        self.timebound = timebound
        self.me = net.peer_id

    async def get_states(self, keys: list[bytes], level: Consistency) -> list[bytes | None]:
        """Ask every live replica of the keys (one request per replica), merge the answers of
        each key once R replicas gave one, and repair replicas that answered stale."""
        self.authority.check_admitted()
        needed = level.needed(self.placement.copies())
        wanted: dict[str, list[int]] = {}
        for index, key in enumerate(keys):
            for peer in self.placement.alive_replicas(key):
                wanted.setdefault(peer, []).append(index)
        answers: list[dict[str, bytes | None]] = [{} for _ in keys]
        failures: dict[str, str] = {}  # peer -> why it did not answer
        complete = trio.Event()
        missing = len(keys)
        outstanding = sum((len(ix) + READ_CHUNK - 1) // READ_CHUNK for ix in wanted.values())

        async def ask(peer: str, indices: list[int]) -> None:
            nonlocal missing, outstanding
            try:
                await ask_once(peer, indices)
            finally:
                outstanding -= 1
                if outstanding == 0:  # every replica answered or failed: stop waiting
                    complete.set()

        async def ask_once(peer: str, indices: list[int]) -> None:
            nonlocal missing
            while indices:
                states = await self.read_states(peer, [keys[i] for i in indices], failures)
                if states is None:
                    return
                later: list[int] = []
                for i, state in zip(indices, states, strict=True):
                    if state is False:  # did not fit in this reply: ask again
                        later.append(i)
                        continue
                    answers[i][peer] = state if isinstance(state, bytes) else None
                    if len(answers[i]) == needed:
                        missing -= 1
                if missing == 0:
                    complete.set()
                if len(later) == len(indices):
                    return  # no progress: a single state larger than a reply
                indices = later

        if outstanding == 0:
            complete.set()
        async with trio.open_nursery() as nursery:
            for peer, indices in wanted.items():
                for start in range(0, len(indices), READ_CHUNK):
                    nursery.start_soon(ask, peer, indices[start:start + READ_CHUNK])
            # each request is bounded by its own timeout; stop once every key has R answers
            await complete.wait()
            nursery.cancel_scope.cancel()
        short = [keys[i] for i, a in enumerate(answers) if len(a) < needed]
        if short:
            log.warning("read: %d of %d keys short of %d answers; asked %s; failed: %s",
                        len(short), len(keys), needed,
                        {p[-6:]: len(ix) for p, ix in wanted.items()},
                        {p[-6:]: why for p, why in failures.items()} or "none")
            raise QuorumError(f"read of {short[0]!r} (and {len(short) - 1} more): fewer than "
                              f"{needed} replicas answered")
        self.metrics["reads"] += len(keys)
        return [self.merge_and_repair(key, answer) for key, answer in zip(keys, answers,
                                                                          strict=True)]

    async def read_states(self, peer: str, keys: list[bytes],
                          failures: dict[str, str] | None = None
                          ) -> list[bytes | None | bool] | None:
        """What `peer` (this node included) stores for each of `keys` (at most 1024): a
        state, None (nothing), or False (did not fit in the reply: ask again); None when the
        peer did not answer or answered nonsense, and then why in `failures[peer]`."""
        if peer == self.me:
            return [self.store.get(k) for k in keys]
        try:
            states = await self.net.request(peer, READ_PROTOCOL, {"keys": keys},
                                            timeout=self.config.request_timeout)
        except RequestError as exc:
            log.info("read of %d keys from %s failed: %s", len(keys), peer, exc)
            if failures is not None:
                failures[peer] = str(exc)[:200]
            return None
        if not isinstance(states, list) or len(states) != len(keys):
            if failures is not None:
                failures[peer] = "malformed answer"
            return None
        return states

    def merge_and_repair(self, key: bytes, answers: dict[str, bytes | None]) -> bytes | None:
        """The merge of the replicas' answers for `key` (peer -> state or None; entries that
        cannot take part are removed); replicas that answered otherwise are sent the merge."""
        # answers beyond the clock skew bound are left out of the merge (never written back)
        # and their replicas repaired with an override from the others; a key whose answers
        # are all beyond the bound reads as absent until an operator overrides it
        now_ms = wall_ms()
        beyond = self.timebound.beyond_or_false
        skewed = [peer for peer, state in answers.items()
                  if state is not None and beyond(state, now_ms)]
        for peer in skewed:
            del answers[peer]
        if skewed:
            self.metrics["skew_refused"] += len(skewed)
            self.timebound.report(len(skewed), f"of {shown_key(key)} answering a read from",
                                  ", ".join(p[-6:] for p in skewed))
        merged: bytes | None = None
        for peer, state in list(answers.items()):
            if state is None:
                continue
            try:
                merged = crdt.merge_encoded(merged, state)
            except (crdt.DecodeError, TypeError, ValueError) as exc:
                del answers[peer]
                try:
                    crdt.decode(state)
                except crdt.DecodeError:
                    log.warning("replica %s answered a corrupt state for %r: %s", peer, key, exc)
                    self.net.penalize(peer, "malformed")
                    continue
                # both states are sound but of different types (concurrent first writes of
                # two types): keep the first, report the conflict
                self.metrics["type_conflicts"] += 1
                log.warning("type conflict on %r between replicas: %s", key, exc)
        if merged is not None:
            for peer, state in answers.items():
                if state != merged:
                    self.metrics["read_repairs"] += 1
                    self.writes.send_nowait(peer, Delta(key, merged, None, None))
            for peer in skewed:
                self.metrics["read_repairs"] += 1
                self.writes.send_nowait(peer, Delta(key, merged, None, None, override=True))
        elif skewed:
            log.warning("%s reads as absent: every replica that answered holds a state beyond "
                        "the clock skew bound; an operator may overwrite or delete it with "
                        "override_skew", shown_key(key))
        return merged

    async def on_read(self, peer: str, message: Any) -> Any:
        """A peer reads keys of this node's own store (kv-read)."""
        keys = message.get("keys") if isinstance(message, dict) else None
        if not isinstance(keys, list) or len(keys) > READ_CHUNK or \
                not all(isinstance(k, bytes) for k in keys):
            raise HandlerError("bad_request", "read needs a list of at most 1024 byte keys")
        # states that would make the reply larger than a batch come back as False: the
        # reader asks for them again
        replies: list[bytes | None | bool] = []
        size, limit = 0, self.config.max_batch_bytes
        for key in keys:
            state = self.store.get(key) if size <= limit else None
            if size > limit or (state is not None and replies and size + len(state) > limit):
                replies.append(False)
                size = limit + 1
                continue
            size += len(state) if state is not None else 0
            replies.append(state)
        return replies
