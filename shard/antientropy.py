# Anti-entropy exchange between two replicas: sans-IO state machines (messages in, messages out).
# Lives here: the message formats, their validation, and the descent from the roots of the two hash
# trees to exactly the keys whose states differ, then the swap of those states.
# Must not live here: sockets, streams, clocks, randomness, or writes to a store. The caller moves
# the messages (any transport; every message is a plain msgpack-able dict) and afterwards merges
# `received` into its own store.
#
# The compared tree covers a chosen set of partitions (both sides use the same set: partitions
# outside it count as empty). Its depths are bit lengths of leaf-index prefixes: 0 (the root), then
# steps of FANOUT_BITS down to the partition depth q, then steps down to the leaf depth
# q + s. Nodes at depths <= q come from a snapshot of the partition roots taken when the session
# starts; nodes below come live from the tree. A write racing with the exchange can only cause an
# extra descent or a missed key that the next exchange finds: the merge is idempotent.
#
# Flow (I = initiator, R = responder; the roles swap at each step of the descent):
#   I -> R  hi     {t, v, ks, parts, h}: version, key-space fingerprint, partition set, root hash
#   x -> y  nodes  {t, d, at, h}: for parents `at` at depth d, the sender's hashes of their
#                  children; sent only for parents found different, so traffic follows divergence
#   x -> y  keys   {t, at, k}: for differing leaves `at`, the sender's (key, entry hash) lists
#   y -> x  diff   {t, s, want}: y's states of the keys x lacks or holds differently, and the keys
#                  whose states y wants from x
#   x -> y  states {t, s}: x's states of the wanted keys (omitted when y wants nothing)
#   any     bye    {t}: nothing (more) differs; the session ends
# Any malformed, out-of-place or inconsistent message raises ProtocolError and ends the session.
from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import reduce
from operator import xor
from typing import Any

from .keyspace import Keyspace
from .merkle import HashTree, entry_hash

PROTOCOL_VERSION = 1
FANOUT_BITS = 5
HASH_BYTES = 8

ReadSegment = Callable[[int, int], Sequence[tuple[bytes, bytes]]]
Message = dict[str, Any]


class ProtocolError(Exception):
    """A message was malformed, unexpected or inconsistent; the session is over."""


def exchange_depths(keyspace: Keyspace) -> list[int]:
    """Depths (in leaf-index bits) of the tree levels an exchange walks, root first."""
    q, leaf = keyspace.partition_bits, keyspace.leaf_bits
    depths = {0, q, leaf}
    depths.update(range(q, 0, -FANOUT_BITS))
    depths.update(range(q + FANOUT_BITS, leaf, FANOUT_BITS))
    return sorted(depths)


def encode_partitions(keyspace: Keyspace, partitions: Collection[int] | None) -> bytes | None:
    """The wire form of a partition set: None for all, else a zlib-compressed bitmap."""
    if partitions is None:
        return None
    bitmap = bytearray(-(-keyspace.partitions // 8))
    for partition in partitions:
        keyspace.check_partition(partition)
        bitmap[partition >> 3] |= 0x80 >> (partition & 7)
    return zlib.compress(bytes(bitmap), 9)


def decode_partitions(keyspace: Keyspace, wire: object) -> frozenset[int] | None:
    if wire is None:
        return None
    if not isinstance(wire, bytes):
        raise ProtocolError("parts must be bytes or nil")
    size = -(-keyspace.partitions // 8)
    inflater = zlib.decompressobj()
    try:
        bitmap = inflater.decompress(wire, size + 1)
    except zlib.error as exc:
        raise ProtocolError(f"parts is not a valid compressed bitmap: {exc}") from None
    if len(bitmap) != size or not inflater.eof or inflater.unused_data:
        raise ProtocolError(f"parts must inflate to exactly {size} bytes")
    chosen = frozenset(p for p in range(size * 8) if bitmap[p >> 3] & (0x80 >> (p & 7)))
    if chosen and max(chosen) >= keyspace.partitions:
        raise ProtocolError("parts names partitions beyond the key space")
    return chosen


def _pack_hashes(hashes: Sequence[int]) -> bytes:
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def _unpack_hashes(blob: object, count: int) -> tuple[int, ...]:
    if not isinstance(blob, bytes) or len(blob) != count * HASH_BYTES:
        raise ProtocolError(f"expected {count} hashes of {HASH_BYTES} bytes")
    return struct.unpack(f"<{count}Q", blob)


def _fields(msg: object, kind: str, names: frozenset[str]) -> dict[str, Any]:
    if not isinstance(msg, dict) or set(msg) != names:
        raise ProtocolError(f"a {kind} message has exactly the fields {sorted(names)}")
    return msg


def _index_list(value: object, what: str) -> list[int]:
    """A non-empty, strictly increasing list of non-negative ints."""
    if not isinstance(value, list | tuple) or not value:
        raise ProtocolError(f"{what} must be a non-empty list")
    previous = -1
    for item in value:
        if type(item) is not int or item <= previous:
            raise ProtocolError(f"{what} must be strictly increasing non-negative integers")
        previous = item
    return list(value)


def _pairs(value: object, what: str) -> list[tuple[bytes, bytes]]:
    if not isinstance(value, list | tuple):
        raise ProtocolError(f"{what} must be a list")
    pairs = []
    for item in value:
        if (not isinstance(item, list | tuple) or len(item) != 2
                or not isinstance(item[0], bytes) or not isinstance(item[1], bytes)):
            raise ProtocolError(f"every item of {what} must be a pair of byte strings")
        pairs.append((item[0], item[1]))
    return pairs


def _key_list(value: object, what: str) -> list[bytes]:
    if not isinstance(value, list | tuple) or not all(isinstance(k, bytes) for k in value):
        raise ProtocolError(f"{what} must be a list of byte strings")
    if len(set(value)) != len(value):
        raise ProtocolError(f"{what} repeats a key")
    return list(value)


_HI = frozenset({"t", "v", "ks", "parts", "h"})
_NODES = frozenset({"t", "d", "at", "h"})
_KEYS = frozenset({"t", "at", "k"})
_DIFF = frozenset({"t", "s", "want"})
_STATES = frozenset({"t", "s"})
_BYE = frozenset({"t"})


class _Session:
    """What both roles share: the compared tree, the expectations, the outcome."""

    def __init__(self, tree: HashTree, read_segment: ReadSegment) -> None:
        self._tree = tree
        self._read_segment = read_segment
        self.keyspace = tree.keyspace
        depths = exchange_depths(self.keyspace)
        # Depth of the children of a node at each depth; -1 is a virtual parent above the root.
        self._next_depth = dict(zip([-1, *depths], depths, strict=False))
        self._leaf_depth = self.keyspace.leaf_bits
        self._partition_depth = self.keyspace.partition_bits
        self._partitions: frozenset[int] | None = None
        self._levels: dict[int, list[int]] = {}
        # What the next message may be: its type, and for nodes/keys the depth of the parents we
        # sent hashes for and which they were.
        self._expect = ""
        self._parent_depth = -1
        self._parents: frozenset[int] = frozenset()
        self._offered: dict[bytes, bytes] = {}
        self._leaves: frozenset[int] = frozenset()
        self._want: frozenset[bytes] = frozenset()
        self.received: list[tuple[bytes, bytes]] = []
        self.done = False
        self.failed = False

    # -- the compared tree ----------------------------------------------------------------------

    def _snapshot(self, partitions: frozenset[int] | None) -> None:
        self._partitions = partitions
        roots = self._tree.partition_roots()
        level = list(roots) if partitions is None else [
            roots[p] if p in partitions else 0 for p in range(len(roots))]
        depth = self._partition_depth
        self._levels = {depth: level}
        for upper in sorted((d for d in self._next_depth.values() if d < depth), reverse=True):
            group = 1 << (depth - upper)
            level = [reduce(xor, level[i:i + group]) for i in range(0, len(level), group)]
            self._levels[upper] = level
            depth = upper

    def _included(self, partition: int) -> bool:
        return self._partitions is None or partition in self._partitions

    def _step(self, depth: int) -> int:
        """Bits from a node at `depth` to its children (the virtual parent has one child)."""
        return 0 if depth < 0 else self._next_depth[depth] - depth

    def _child_hashes(self, depth: int, parents: Iterable[int]) -> list[int]:
        """This side's hashes of all children of `parents` (at `depth`, -1 = above the root)."""
        child = self._next_depth[depth]
        step = self._step(depth)
        hashes: list[int] = []
        for parent in parents:
            first, stop = parent << step, (parent + 1) << step
            if child <= self._partition_depth:
                hashes.extend(self._levels[child][first:stop])
                continue
            span = self._leaf_depth - child
            if not self._included(first >> (child - self._partition_depth)):
                hashes.extend([0] * (stop - first))
            elif span == 0:
                hashes.extend(self._tree.leaf_span(first, stop))
            else:
                leaves = self._tree.leaf_span(first << span, stop << span)
                width = 1 << span
                hashes.extend(reduce(xor, leaves[i:i + width])
                              for i in range(0, len(leaves), width))
        return hashes

    def _nodes_message(self, depth: int, parents: list[int]) -> Message:
        self._expect_reply(depth, parents)
        return {"t": "nodes", "d": depth, "at": parents,
                "h": _pack_hashes(self._child_hashes(depth, parents))}

    def _expect_reply(self, depth: int, parents: list[int]) -> None:
        self._parent_depth = depth
        self._parents = frozenset(parents)
        self._expect = "keys" if self._next_depth[depth] == self._leaf_depth else "nodes"

    def _compare(self, depth: int, parents: list[int], theirs_blob: object) -> Message | None:
        """Compare the peer's hashes of the children of `parents` with ours and answer."""
        child = self._next_depth[depth]
        step = self._step(depth)
        mine = self._child_hashes(depth, parents)
        theirs = _unpack_hashes(theirs_blob, len(mine))
        children = [c for p in parents for c in range(p << step, (p + 1) << step)]
        differing = [c for c, a, b in zip(children, mine, theirs, strict=True) if a != b]
        if not differing:
            return self._finish({"t": "bye"})
        if child == self._leaf_depth:
            return self._keys_message(differing)
        return self._nodes_message(child, differing)

    # -- key phase -------------------------------------------------------------------------------

    def _segment(self, leaf: int) -> list[tuple[bytes, bytes]]:
        partition, segment = divmod(leaf, self.keyspace.segments)
        if not self._included(partition):
            return []
        return list(self._read_segment(partition, segment))

    def _keys_message(self, leaves: list[int]) -> Message:
        listing = []
        for leaf in leaves:
            entries = self._segment(leaf)
            self._offered.update(entries)
            listing.append([[key, entry_hash(key, state).to_bytes(HASH_BYTES, "little")]
                            for key, state in entries])
        self._leaves = frozenset(leaves)
        self._expect = "diff"
        return {"t": "keys", "at": leaves, "k": listing}

    def _on_keys(self, msg: dict[str, Any]) -> Message | None:
        leaves = self._checked_children(msg["at"])
        listing = msg["k"]
        if not isinstance(listing, list | tuple) or len(listing) != len(leaves):
            raise ProtocolError("k must hold one key list per leaf")
        theirs: dict[bytes, bytes] = {}
        for leaf, entries in zip(leaves, listing, strict=True):
            for key, digest in _pairs(entries, "a key list"):
                if len(digest) != HASH_BYTES or key in theirs:
                    raise ProtocolError("a key list entry is malformed or repeated")
                if self.keyspace.leaf_of(key) != leaf:
                    raise ProtocolError(f"key {key!r} does not belong to leaf {leaf}")
                theirs[key] = digest
        give: list[list[bytes]] = []  # states the peer lacks or holds differently
        want: list[bytes] = []  # keys we lack or hold differently
        for leaf in leaves:
            for key, state in self._segment(leaf):
                digest = entry_hash(key, state).to_bytes(HASH_BYTES, "little")
                their_digest = theirs.pop(key, None)
                if their_digest != digest:
                    give.append([key, state])
                    if their_digest is not None:
                        want.append(key)
        want.extend(theirs)  # keys only the peer has
        want.sort()
        self._want = frozenset(want)
        if not want:
            return self._finish({"t": "diff", "s": give, "want": []})
        self._expect = "states"
        return {"t": "diff", "s": give, "want": want}

    def _on_diff(self, msg: dict[str, Any]) -> Message | None:
        given = _pairs(msg["s"], "s")
        want = _key_list(msg["want"], "want")
        if len({key for key, _ in given}) != len(given):
            raise ProtocolError("s repeats a key")
        for key, _ in given:
            if self.keyspace.leaf_of(key) not in self._leaves:
                raise ProtocolError(f"key {key!r} is outside the compared leaves")
        if any(key not in self._offered for key in want):
            raise ProtocolError("want names a key this side did not list")
        self.received.extend(given)
        if not want:
            return self._finish(None)
        return self._finish({"t": "states", "s": [[key, self._offered[key]] for key in want]})

    def _on_states(self, msg: dict[str, Any]) -> None:
        given = _pairs(msg["s"], "s")
        if len(given) != len(self._want) or {key for key, _ in given} != self._want:
            raise ProtocolError("states must carry exactly the wanted keys")
        self.received.extend(given)
        self._finish(None)

    # -- dispatch --------------------------------------------------------------------------------

    def _checked_children(self, value: object) -> list[int]:
        """Indices one level below the parents we sent, each under one of them."""
        children = _index_list(value, "at")
        step = self._step(self._parent_depth)
        if any(c >> step not in self._parents for c in children):
            raise ProtocolError("at names nodes below parents this side did not send")
        return children

    def _finish(self, reply: Message | None) -> Message | None:
        self.done = True
        self._expect = ""
        return reply

    def receive(self, msg: object) -> Message | None:
        """Take one message from the peer; return the message to send back, or None."""
        if self.failed or self.done:
            raise ProtocolError("the session is over")
        try:
            return self._dispatch(msg)
        except ProtocolError:
            self.failed = True
            raise

    def _dispatch(self, msg: object) -> Message | None:
        kind = msg.get("t") if isinstance(msg, dict) else None
        if kind == "bye":
            _fields(msg, "bye", _BYE)
            if self._expect not in ("nodes", "keys"):
                raise ProtocolError(f"unexpected bye (expecting {self._expect or 'nothing'})")
            return self._finish(None)
        if kind != self._expect or not isinstance(kind, str):
            raise ProtocolError(f"unexpected message {kind!r} (expecting {self._expect!r})")
        if kind == "hi":
            return self._on_hi(_fields(msg, "hi", _HI))
        if kind == "nodes":
            fields = _fields(msg, "nodes", _NODES)
            if type(fields["d"]) is not int or fields["d"] != self._next_depth[self._parent_depth]:
                raise ProtocolError("nodes message at the wrong depth")
            parents = self._checked_children(fields["at"])
            return self._compare(fields["d"], parents, fields["h"])
        if kind == "keys":
            return self._on_keys(_fields(msg, "keys", _KEYS))
        if kind == "diff":
            return self._on_diff(_fields(msg, "diff", _DIFF))
        self._on_states(_fields(msg, "states", _STATES))
        return None

    def _on_hi(self, msg: dict[str, Any]) -> Message | None:
        raise ProtocolError("unexpected hi")


class Initiator(_Session):
    """The side that opens an exchange over a set of partitions (None = all)."""

    def __init__(self, tree: HashTree, read_segment: ReadSegment,
                 partitions: Collection[int] | None = None) -> None:
        super().__init__(tree, read_segment)
        self._wire_partitions = encode_partitions(self.keyspace, partitions)
        self._start_partitions = None if partitions is None else frozenset(partitions)
        self._started = False

    def start(self) -> Message:
        if self._started:
            raise ProtocolError("the session has already started")
        self._started = True
        self._snapshot(self._start_partitions)
        # The peer answers with the root's children (or bye), as if we had sent a nodes message
        # for a virtual parent above the root.
        self._expect_reply(-1, [0])
        return {"t": "hi", "v": PROTOCOL_VERSION, "ks": self.keyspace.fingerprint,
                "parts": self._wire_partitions, "h": _pack_hashes(self._child_hashes(-1, [0]))}

    def receive(self, msg: object) -> Message | None:
        if not self._started:
            raise ProtocolError("start() the session before receiving")
        return super().receive(msg)


class Responder(_Session):
    """The side that answers an exchange; `partitions` limits what it agrees to compare."""

    def __init__(self, tree: HashTree, read_segment: ReadSegment,
                 partitions: Collection[int] | None = None) -> None:
        super().__init__(tree, read_segment)
        self._serves = None if partitions is None else frozenset(partitions)
        self._expect = "hi"

    def _on_hi(self, msg: dict[str, Any]) -> Message | None:
        if msg["v"] != PROTOCOL_VERSION or type(msg["v"]) is not int:
            raise ProtocolError(f"unsupported protocol version {msg['v']!r}")
        if msg["ks"] != self.keyspace.fingerprint:
            raise ProtocolError("the peer uses another key space (partitions, segments or salt)")
        asked = decode_partitions(self.keyspace, msg["parts"])
        if self._serves is not None and (asked is None or not asked <= self._serves):
            raise ProtocolError("the peer asked for partitions this side does not serve")
        self._snapshot(asked)
        self._parent_depth, self._parents = -1, frozenset([0])
        return self._compare(-1, [0], msg["h"])
