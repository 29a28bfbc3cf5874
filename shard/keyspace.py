# The key space: how a key maps to its partition and to its anti-entropy segment.
# Lives here: the keyed hash of a key, the 3-byte prefix every stored key is laid out under, and
# the arithmetic between prefixes, partitions, segments and leaves (leaf = partition * S + segment).
# Must not live here: membership (ring.py), storage (store.py), hashing of values (merkle.py).
#
# Layout: prefix = keyed BLAKE2s of the key (key = the network salt), 3-byte digest. Its top
# q bits are the partition (q = log2 partitions), the next s bits the segment inside the
# partition (s = log2 segments), the rest is hash noise. A stored key is prefix + key, so a
# partition and a segment are both contiguous key ranges: a partition moves, drops and scans as
# one range, and anti-entropy reads one segment as one range. With the default 65,536
# partitions the first two bytes are exactly the partition number, big-endian.
from __future__ import annotations

import hashlib

PREFIX_BYTES = 3
PREFIX_BITS = 8 * PREFIX_BYTES
DEFAULT_PARTITIONS = 65_536
DEFAULT_SEGMENTS = 16
DEFAULT_SALT = b"tasknet/keyspace/v1"
_MAX_SALT = 32  # BLAKE2s key length limit


def _log2_exact(value: int, what: str) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{what} must be a power of two >= 1, got {value}")
    return value.bit_length() - 1


class Keyspace:
    """Maps keys to partitions and segments; immutable once built."""

    __slots__ = ("partitions", "segments", "salt", "partition_bits", "segment_bits", "leaf_bits",
                 "prefix_hasher", "_partition_shift", "_leaf_shift", "fingerprint")

    def __init__(self, partitions: int = DEFAULT_PARTITIONS, segments: int = DEFAULT_SEGMENTS,
                 salt: bytes = DEFAULT_SALT) -> None:
        self.partition_bits = _log2_exact(partitions, "partitions")
        self.segment_bits = _log2_exact(segments, "segments")
        self.leaf_bits = self.partition_bits + self.segment_bits
        if self.leaf_bits > PREFIX_BITS:
            raise ValueError(
                f"partitions * segments must be <= 2**{PREFIX_BITS}, got {partitions * segments}")
        if not isinstance(salt, bytes) or len(salt) > _MAX_SALT:
            raise ValueError(f"salt must be bytes of at most {_MAX_SALT} bytes")
        self.partitions = partitions
        self.segments = segments
        self.salt = salt
        # The keyed hasher behind prefix(); hot loops copy() it, nobody may update it in place.
        self.prefix_hasher = hashlib.blake2s(digest_size=PREFIX_BYTES, key=salt)
        self._partition_shift = PREFIX_BITS - self.partition_bits
        self._leaf_shift = PREFIX_BITS - self.leaf_bits
        # Identifies the layout: prefix hash, partitions, segments and salt (not the salt itself).
        self.fingerprint = hashlib.blake2b(
            b"blake2s-prefix/%d/%d" % (partitions, segments), digest_size=8, key=salt,
            person=b"tasknet-keyspace").digest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Keyspace) and self.fingerprint == other.fingerprint

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __repr__(self) -> str:
        return f"Keyspace(partitions={self.partitions}, segments={self.segments})"

    def prefix(self, key: bytes) -> bytes:
        """The 3-byte prefix the key is stored under (keyed hash of the key)."""
        hasher = self.prefix_hasher.copy()
        hasher.update(key)
        return hasher.digest()

    def partition_of(self, key: bytes) -> int:
        return int.from_bytes(self.prefix(key), "big") >> self._partition_shift

    def leaf_of_prefix(self, prefix: bytes) -> int:
        """Global leaf index (partition * segments + segment) of a prefix (or a stored key)."""
        return int.from_bytes(prefix[:PREFIX_BYTES], "big") >> self._leaf_shift

    def leaf_of(self, key: bytes) -> int:
        return self.leaf_of_prefix(self.prefix(key))

    def leaf_range(self, first_leaf: int, stop_leaf: int) -> tuple[bytes, bytes | None]:
        """Stored-key range [start, stop) covering leaves first_leaf .. stop_leaf - 1.

        stop is None when the range runs to the end of the key space."""
        start = (first_leaf << self._leaf_shift).to_bytes(PREFIX_BYTES, "big")
        if stop_leaf >= 1 << self.leaf_bits:
            return start, None
        return start, (stop_leaf << self._leaf_shift).to_bytes(PREFIX_BYTES, "big")

    def partition_range(self, partition: int) -> tuple[bytes, bytes | None]:
        self.check_partition(partition)
        first = partition << self.segment_bits
        return self.leaf_range(first, first + self.segments)

    def segment_range(self, partition: int, segment: int) -> tuple[bytes, bytes | None]:
        self.check_partition(partition)
        if not 0 <= segment < self.segments:
            raise ValueError(f"segment {segment} out of range 0..{self.segments - 1}")
        leaf = (partition << self.segment_bits) | segment
        return self.leaf_range(leaf, leaf + 1)

    def check_partition(self, partition: int) -> None:
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition {partition} out of range 0..{self.partitions - 1}")
