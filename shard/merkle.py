# The anti-entropy hash tree of one store (Tictac-tree style: nodes combine by XOR), with the key
# count of every partition.
# Lives here: the hash of one entry (key, canonical state), the XOR tree over the key space's leaves
# (leaf = one segment of one partition) with its partition roots, and a from-scratch build.
# Must not live here: I/O (the store feeds it), the exchange protocol (antientropy.py).
#
# A leaf holds the XOR of entry_hash(key, state) over the entries in its segment, a partition root
# the XOR of its leaves. XOR makes updates incremental and order-free: a write XORs out the old
# entry's hash and XORs in the new one, and the result equals a build from a scan. Nodes above
# the partition roots are folded on demand by the exchange (over the partitions it covers).
from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections.abc import Iterable

from .keyspace import PREFIX_BITS, PREFIX_BYTES, Keyspace

# A change of stored key (prefix + key) from one state to another; None before = a new key.
Change = tuple[bytes, tuple[bytes | None, bytes]]

_SHORT_LENGTH = [bytes([n]) for n in range(255)]
_SNAPSHOT_FORMAT = b"tasknet-tree/1:"
_blake2s = hashlib.blake2s  # per call the cheapest strong hash in the standard library here
_first_word = struct.Struct("<Q").unpack_from


def _length_tail(n: int) -> bytes:
    return _SHORT_LENGTH[n] if n < 255 else n.to_bytes(4, "big") + b"\xff"


def entry_hash(key: bytes, state: bytes) -> int:
    """64-bit hash of one entry (the first word of a BLAKE2s digest). The key length is appended
    so that (key, state) pairs that concatenate to the same bytes still hash differently."""
    word: int = _first_word(_blake2s(key + state + _length_tail(len(key))).digest())[0]
    return word


class HashTree:
    """XOR hashes of every leaf and partition of a key space (64-bit each, in memory), and the
    number of keys in every partition."""

    __slots__ = ("keyspace", "_leaves", "_roots", "_counts", "_segment_bits", "_leaf_shift")

    def __init__(self, keyspace: Keyspace) -> None:
        self.keyspace = keyspace
        self._segment_bits = keyspace.segment_bits
        self._leaf_shift = PREFIX_BITS - keyspace.leaf_bits
        self._leaves = array("Q", bytes(8 * keyspace.partitions * keyspace.segments))
        self._roots = array("Q", bytes(8 * keyspace.partitions))
        self._counts = array("Q", bytes(8 * keyspace.partitions))

    @classmethod
    def build(cls, keyspace: Keyspace, stored: Iterable[tuple[bytes, bytes]]) -> HashTree:
        """A tree from scratch, from (stored key, state) pairs (stored key = prefix + key)."""
        tree = cls(keyspace)
        tree.record((stored_key, (None, state)) for stored_key, state in stored)
        return tree

    def to_bytes(self) -> bytes:
        """A snapshot: format tag, key-space fingerprint, then counts, roots and leaves as
        little-endian 64-bit words."""
        words = [self._counts, self._roots, self._leaves]
        if sys.byteorder == "big":
            words = [a[:] for a in words]
            for a in words:
                a.byteswap()
        return b"".join([_SNAPSHOT_FORMAT, self.keyspace.fingerprint,
                         *(a.tobytes() for a in words)])

    @classmethod
    def from_bytes(cls, keyspace: Keyspace, snapshot: bytes) -> HashTree:
        """The tree of a snapshot made by to_bytes(); ValueError if it does not fit the key
        space."""
        tree = cls(keyspace)
        header = _SNAPSHOT_FORMAT + keyspace.fingerprint
        arrays = [tree._counts, tree._roots, tree._leaves]
        if (not snapshot.startswith(header)
                or len(snapshot) != len(header) + 8 * sum(len(a) for a in arrays)):
            raise ValueError("not a hash tree snapshot of this key space")
        offset = len(header)
        for a in arrays:
            size = 8 * len(a)
            a[:] = array("Q", snapshot[offset:offset + size])
            if sys.byteorder == "big":
                a.byteswap()
            offset += size
        return tree

    def record(self, changes: Iterable[Change]) -> None:
        """Account for written entries: (stored key, (state before, state after)) each.

        The hot path of every store write, hence the inlined hashing."""
        leaves, roots, counts = self._leaves, self._roots, self._counts
        leaf_shift, segment_bits = self._leaf_shift, self._segment_bits
        from_bytes, blake2s, first_word = int.from_bytes, _blake2s, _first_word
        short = _SHORT_LENGTH
        for stored, (before, after) in changes:
            if before == after:
                continue
            key = stored[PREFIX_BYTES:]
            n = len(key)
            tail = short[n] if n < 255 else _length_tail(n)
            change = first_word(blake2s(key + after + tail).digest())[0]
            leaf = from_bytes(stored[:PREFIX_BYTES], "big") >> leaf_shift
            if before is None:
                counts[leaf >> segment_bits] += 1
            else:
                change ^= first_word(blake2s(key + before + tail).digest())[0]
            leaves[leaf] ^= change
            roots[leaf >> segment_bits] ^= change

    def forget(self, removed: Iterable[tuple[bytes, bytes]]) -> None:
        """Account for deleted entries: (stored key, state it held) each."""
        leaves, roots, counts = self._leaves, self._roots, self._counts
        for stored, state in removed:
            key = stored[PREFIX_BYTES:]
            change = entry_hash(key, state)
            leaf = int.from_bytes(stored[:PREFIX_BYTES], "big") >> self._leaf_shift
            partition = leaf >> self._segment_bits
            leaves[leaf] ^= change
            roots[partition] ^= change
            counts[partition] -= 1

    def leaf(self, leaf: int) -> int:
        return self._leaves[leaf]

    def leaf_span(self, first: int, stop: int) -> array[int]:
        """Hashes of leaves first .. stop - 1 (a copy)."""
        return self._leaves[first:stop]

    def partition_root(self, partition: int) -> int:
        return self._roots[partition]

    def partition_roots(self) -> array[int]:
        """Roots of every partition (a copy)."""
        return self._roots[:]

    def count(self, partition: int) -> int:
        """Number of keys in a partition."""
        return self._counts[partition]

    def total(self) -> int:
        return sum(self._counts)

    def clear_partition(self, partition: int) -> None:
        first = partition << self._segment_bits
        stop = first + self.keyspace.segments
        self._leaves[first:stop] = array("Q", bytes(8 * self.keyspace.segments))
        self._roots[partition] = 0
        self._counts[partition] = 0

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, HashTree) and self.keyspace == other.keyspace
                and self._leaves == other._leaves and self._roots == other._roots
                and self._counts == other._counts)

    __hash__ = None  # type: ignore[assignment]  # mutable
