# The ring: which nodes own which partition. Pure and deterministic: no I/O, no clock, no
# randomness; the same member set (ids and weights, in any order) gives the same ring everywhere.
# Must not live here: storage, networking, or any history of past rings (a ring is a function of
# its members alone).
#
# Design (Dynamo's "strategy 3" with a consistent-hashing placement of the fixed partitions):
# - Q fixed partitions (default 65,536); a key's partition is the top bits of a keyed hash of the
#   key (see keyspace.py), so a partition is a unit of storage, hand-off and anti-entropy.
# - Every node puts round(vnodes * weight) points on a 64-bit circle, from a keyed hash of its id.
#   Partition p sits at position p * 2**64 / Q; its preference list is the distinct nodes met
#   walking clockwise from that position: primary first, then the other replicas, then (beyond N)
#   the fall-back nodes for hinted hand-off.
# - A node's points depend only on its own id and weight, so a join inserts the newcomer into the
#   walks it wins and changes nothing else, and a leave removes the leaver from its walks: only
#   partitions the node gains or loses move. This also holds for weight changes.
# Why Q = 65,536 and 1,024 points per unit of weight: the load spread of consistent hashing is
# about 1/sqrt(points per node) (3.1% at 1,024), plus a rounding term of about
# sqrt(points / 6) / (Q / n) because partitions are sampled at fixed positions (1.4% at n = 100
# with Q = 65,536, but 5.6% with Q = 4,096). 65,536 is the largest Q whose partition number still
# fits the 2-byte big-endian prefix of the store layout.
from __future__ import annotations

import hashlib
import math
import struct
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

from .keyspace import DEFAULT_PARTITIONS, DEFAULT_SALT, Keyspace

DEFAULT_REPLICAS = 3
DEFAULT_VNODES = 1024
_POINTS_PER_DIGEST = 8
_POINT_BLOCK = struct.Struct(">8Q")
_VNODE_PERSON = b"tasknet-vnode"


class OwnerChange(NamedTuple):
    """Preference lists of one partition before and after a membership change."""

    old: tuple[str, ...]
    new: tuple[str, ...]


def _weights_of(members: Mapping[str, float] | Iterable[str]) -> dict[str, float]:
    if isinstance(members, str | bytes):
        raise TypeError("members must be a mapping of node id to weight or an iterable of ids")
    if isinstance(members, Mapping):
        weights = {node: float(weight) for node, weight in members.items()}
    else:
        weights = {}
        for node in members:
            if node in weights:
                raise ValueError(f"duplicate member {node!r}")
            weights[node] = 1.0
    if not weights:
        raise ValueError("a ring needs at least one member")
    for node, weight in weights.items():
        if not isinstance(node, str) or not node:
            raise ValueError(f"node ids must be non-empty strings, got {node!r}")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight of {node!r} must be finite and > 0, got {weight}")
    return weights


def vnode_points(node: str, count: int, salt: bytes) -> list[int]:
    """The first `count` ring points of a node (a prefix-stable sequence)."""
    ident = node.encode()
    points: list[int] = []
    for block in range(-(-count // _POINTS_PER_DIGEST)):
        digest = hashlib.blake2b(ident + b"\x00" + block.to_bytes(4, "big"), digest_size=64,
                                 key=salt, person=_VNODE_PERSON).digest()
        points.extend(_POINT_BLOCK.unpack(digest))
    del points[count:]
    return points


class Ring:
    """Partition ownership for one member set. Immutable."""

    def __init__(self, members: Mapping[str, float] | Iterable[str],
                 partitions: int = DEFAULT_PARTITIONS, replicas: int = DEFAULT_REPLICAS,
                 key_salt: bytes = DEFAULT_SALT, vnodes: int = DEFAULT_VNODES) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {vnodes}")
        weights = _weights_of(members)
        self.keyspace = Keyspace(partitions, salt=key_salt)
        self.replicas = replicas
        self.vnodes = vnodes
        self._weights = {node: weights[node] for node in sorted(weights)}
        self._names = tuple(self._weights)
        placed: list[tuple[int, int]] = []
        for index, node in enumerate(self._names):
            count = max(1, round(vnodes * self._weights[node]))
            placed.extend((point, index) for point in vnode_points(node, count, key_salt))
        # Ties between equal points (chance 2**-64) break by node id, which is member-set free.
        placed.sort()
        self._points = [point for point, _ in placed]
        self._point_nodes = [index for _, index in placed]
        self._owners = self._build_owners()

    def _build_owners(self) -> list[tuple[str, ...]]:
        shift = 64 - self.keyspace.partition_bits
        total = len(self._points)
        want = min(self.replicas, len(self._names))
        by_start: dict[int, tuple[str, ...]] = {}
        owners = []
        for partition in range(self.keyspace.partitions):
            start = bisect_left(self._points, partition << shift)
            if start == total:
                start = 0
            found = by_start.get(start)
            if found is None:
                found = by_start[start] = tuple(self._walk(start, want))
            owners.append(found)
        return owners

    def _walk(self, start: int, limit: int) -> Iterator[str]:
        """Distinct node ids clockwise from ring point `start`, at most `limit` of them."""
        limit = min(limit, len(self._names))
        nodes = self._point_nodes
        total = len(nodes)
        seen: set[int] = set()
        position = start
        while len(seen) < limit:
            index = nodes[position]
            if index not in seen:
                seen.add(index)
                yield self._names[index]
            position = position + 1 if position + 1 < total else 0

    @property
    def members(self) -> dict[str, float]:
        return dict(self._weights)

    @property
    def partitions(self) -> int:
        return self.keyspace.partitions

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Ring) and self.keyspace == other.keyspace
                and self.replicas == other.replicas and self.vnodes == other.vnodes
                and self._weights == other._weights)

    def __hash__(self) -> int:
        return hash((self.keyspace, self.replicas, self.vnodes, tuple(self._weights.items())))

    def __repr__(self) -> str:
        return (f"Ring({len(self._names)} members, partitions={self.partitions}, "
                f"replicas={self.replicas}, vnodes={self.vnodes})")

    def partition_of(self, key: bytes) -> int:
        return self.keyspace.partition_of(key)

    def owners(self, partition: int, n: int | None = None) -> list[str]:
        """Preference list of a partition: n distinct nodes (default N), primary first.

        n may exceed N: the nodes after the first N are the fall-backs for hinted hand-off, in
        order. The list is shorter than n only when the ring has fewer than n members."""
        self.keyspace.check_partition(partition)
        if n is None:
            n = self.replicas
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        cached = self._owners[partition]
        if n <= len(cached):
            return list(cached[:n])
        start = bisect_left(self._points, partition << (64 - self.keyspace.partition_bits))
        return list(self._walk(start if start < len(self._points) else 0, n))

    def preference_list(self, key: bytes, n: int | None = None) -> list[str]:
        return self.owners(self.partition_of(key), n)

    def fallbacks(self, partition: int, count: int) -> list[str]:
        """The next `count` distinct nodes after the N owners (hinted hand-off targets)."""
        return self.owners(partition, self.replicas + count)[self.replicas:]

    def primary(self, partition: int) -> str:
        return self.owners(partition, 1)[0]

    def partitions_of(self, node: str, *, primary_only: bool = False) -> set[int]:
        """Partitions the node holds a replica of (or is primary for, with primary_only)."""
        if primary_only:
            return {p for p, owners in enumerate(self._owners) if owners[0] == node}
        return {p for p, owners in enumerate(self._owners) if node in owners}

    def primary_counts(self) -> dict[str, int]:
        """Number of partitions each member is primary for (members with none included)."""
        counts = dict.fromkeys(self._names, 0)
        for owners in self._owners:
            counts[owners[0]] += 1
        return counts


def diff(old: Ring, new: Ring) -> dict[int, OwnerChange]:
    """Partitions whose preference list differs between two rings, with both lists."""
    if old.keyspace != new.keyspace:
        raise ValueError("rings over different key spaces (partitions or salt) cannot be compared")
    return {partition: OwnerChange(before, after)
            for partition, (before, after) in enumerate(zip(old._owners, new._owners, strict=True))
            if before != after}
